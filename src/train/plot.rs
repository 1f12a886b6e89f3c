//! `loss.png`: train and validation loss against tokens seen, one line pair per stage.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use super::Metrics;

static FONT: Once = Once::new();

/// Draws the curve to a temp file and renames it over `path`.
pub fn draw(path: &Path, metrics: &[Metrics]) -> Result<(), Box<dyn std::error::Error>> {
    FONT.call_once(|| {
        // The embedded DejaVu Sans: no system fonts needed.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let train: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| Some((m.tokens as f64, m.train_loss?)))
        .collect();
    let val: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| Some((m.tokens as f64, m.val_loss?)))
        .collect();
    if train.is_empty() {
        return Ok(());
    }
    let all = train.iter().chain(&val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all.clone().map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let y_min = all.map(|p| p.1).fold(f64::INFINITY, f64::min).min(y_max) * 0.95;
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, y_min..y_max)?;
        chart
            .configure_mesh()
            .x_desc("tokens")
            .y_desc("cross-entropy (nats)")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train, &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(val, RED.stroke_width(2)))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
