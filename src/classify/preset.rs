//! What the filter reads and rates: code files, as phi-1 filtered The Stack, or general web text,
//! as phi-2 added web data filtered by educational value (rated FineWeb-Edu's way: an additive
//! 0–5 scale).
//!
//! The preset picks the text column of tables, the loose files read by default, the built-in
//! rating prompt and its variables, and the hashed embedder's features. A classifier records the
//! preset it was trained for, and scoring with another is refused: the features and the ratings
//! of one mean nothing for the other.

use serde::{Deserialize, Serialize};

use crate::generate::prompt::Template;

pub const CODE_PROMPT: &str = include_str!("../../prompts/educational-value.txt");
pub const WEB_PROMPT: &str = include_str!("../../prompts/educational-value-web.txt");

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Source files (The Stack's `content`), rated for a student learning to code (phi-1).
    #[default]
    Code,
    /// Web text (FineWeb's `text`), rated on FineWeb-Edu's additive 0–5 scale (phi-2).
    Web,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Code => "code",
            Preset::Web => "web",
        }
    }

    /// Serde's `skip_serializing_if`: code is left out of step identities written before presets.
    pub fn is_code(&self) -> bool {
        *self == Preset::Code
    }

    /// Table columns that may hold the text, in order of preference.
    pub fn text_columns(self) -> &'static [&'static str] {
        match self {
            Preset::Code => &["content", "text"],
            Preset::Web => &["text"],
        }
    }

    /// Extensions of the loose files read when `--ext` is not given: `.py` for code; none for web
    /// text, which comes in tables (`--ext txt,md` reads loose text files too).
    pub fn default_extensions(self) -> Vec<String> {
        match self {
            Preset::Code => vec!["py".into()],
            Preset::Web => Vec::new(),
        }
    }

    /// The built-in rating prompt: its file name under `prompts/` and its text.
    pub fn builtin_prompt(self) -> (&'static str, &'static str) {
        match self {
            Preset::Code => ("educational-value.txt", CODE_PROMPT),
            Preset::Web => ("educational-value-web.txt", WEB_PROMPT),
        }
    }

    /// The rating prompt's variables for a document `id` and the part of its `text` shown.
    pub fn prompt_vars(self, id: &str, text: String) -> Vec<(&'static str, String)> {
        match self {
            Preset::Code => vec![("path", id.to_string()), ("code", text)],
            Preset::Web => vec![("id", id.to_string()), ("text", text)],
        }
    }

    /// The variables a rating prompt of this preset may use, for error messages.
    pub fn prompt_var_names(self) -> &'static str {
        match self {
            Preset::Code => "{path} and {code}",
            Preset::Web => "{id} and {text}",
        }
    }

    /// Whether `template` renders with this preset's variables (a code prompt given to a web run
    /// asks for `{code}`, which a web run does not fill).
    pub fn fills(self, template: &Template) -> bool {
        let vars = self.prompt_vars("id", String::new());
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        template.render(&refs).is_ok()
    }

    /// The annotation corpus's kind, so ratings of one preset are never resumed as the other's.
    pub fn rating_kind(self) -> &'static str {
        match self {
            Preset::Code => "educational_value",
            Preset::Web => "educational_value_web",
        }
    }

    /// What one input is called in messages and prompts.
    pub fn unit(self) -> &'static str {
        match self {
            Preset::Code => "file",
            Preset::Web => "text",
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each built-in prompt parses and is filled by its own preset's variables, not the other's.
    #[test]
    fn each_builtin_prompt_is_filled_by_its_preset_only() {
        for preset in [Preset::Code, Preset::Web] {
            let (name, text) = preset.builtin_prompt();
            let t = Template::parse(name, text).unwrap();
            assert!(preset.fills(&t), "{name}");
            let other = match preset {
                Preset::Code => Preset::Web,
                Preset::Web => Preset::Code,
            };
            assert!(!other.fills(&t), "{name} is filled by {other}");
        }
    }

    /// The web prompt asks for the line the parser reads: `Educational score: N`, FineWeb-Edu's
    /// answer format, and an additive answer in that format parses to its total.
    #[test]
    fn the_web_prompt_asks_for_the_line_the_parser_reads() {
        assert!(WEB_PROMPT.contains("\"Educational score: \""));
        let answer = "The extract explains photosynthesis (+1), fits a biology lesson (+1, +1), \
            and reads like a textbook (+1). It has some ads, so no fifth point; a score of 5 \
            would need more.\nEducational score: 4";
        let r = super::super::annotate::parse_rating(answer).unwrap();
        assert_eq!(r.score, 4);
        let bold = "Short and clear.\n**Educational score: 2**";
        assert_eq!(super::super::annotate::parse_rating(bold).unwrap().score, 2);
    }
}
