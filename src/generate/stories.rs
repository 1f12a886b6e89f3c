//! TinyStories (Eldan & Li, 2023): short stories in the words a 3–4 year old understands.
//!
//! Each prompt draws one verb, one noun and one adjective from the vocabulary in
//! `seeds/tinystories/` and a random subset of story features, as the paper did. Every kept story
//! is checked for the three words (simple inflections allowed), for dialogue when it was asked
//! for, and for the share of words outside the vocabulary; `stats.json` summarises these and the
//! most common openings (the "Once upon a time" problem).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use polars::prelude::{ChunkAgg, DataFrame, PolarsResult};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::prompt::{Template, TemplateError};
use super::words::{self, WordList, WordsError};
use super::{Corpus, Drop, DropReason};
use crate::artifact::table::row;

/// The built-in prompt and vocabulary (the repository's `prompts/` and `seeds/` files).
pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/tinystories.txt");
const BUILTIN_VERBS: &str = include_str!("../../seeds/tinystories/verbs.txt");
const BUILTIN_NOUNS: &str = include_str!("../../seeds/tinystories/nouns.txt");
const BUILTIN_ADJECTIVES: &str = include_str!("../../seeds/tinystories/adjectives.txt");
const BUILTIN_FUNCTION_WORDS: &str = include_str!("../../seeds/tinystories/function_words.txt");
const BUILTIN_FEATURES: &str = include_str!("../../seeds/tinystories/features.txt");

#[derive(Debug, thiserror::Error)]
pub enum StoriesError {
    #[error(transparent)]
    Words(#[from] WordsError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("{path}:{line}: expected `name | instruction`, found `{text}`")]
    BadFeature {
        path: String,
        line: usize,
        text: String,
    },
    #[error("{path}: could not read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Feature {
    pub name: String,
    pub instruction: String,
}

/// The name of the feature whose presence is checked by looking for quoted speech.
const DIALOGUE: &str = "dialogue";

#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub verbs: WordList,
    pub nouns: WordList,
    pub adjectives: WordList,
    pub features: Vec<Feature>,
    /// Every form of every word a 3–4 year old knows (the three lists plus function words),
    /// mapped to the words it is a form of: a range of `form_lemmas`, which holds word ids.
    /// Looked up for every word of every story, so kept compact (ids, not strings) and hashed
    /// with a fast hasher (the keys are our own word lists).
    forms: HashMap<Box<str>, (u32, u32), foldhash::fast::RandomState>,
    form_lemmas: Vec<u32>,
    /// The id of every word of the lists.
    word_ids: HashMap<String, u32, foldhash::fast::RandomState>,
}

impl Vocabulary {
    /// Loads `verbs.txt`, `nouns.txt`, `adjectives.txt`, `function_words.txt` and `features.txt`
    /// from `dir`, or the built-in lists when `dir` is `None`.
    pub fn load(dir: Option<&Path>) -> Result<Vocabulary, StoriesError> {
        let read = |name: &str, builtin: &'static str| -> Result<(String, String), StoriesError> {
            match dir {
                None => Ok((
                    format!("<built-in seeds/tinystories/{name}>"),
                    builtin.to_string(),
                )),
                Some(d) => {
                    let p = d.join(name);
                    let text = std::fs::read_to_string(&p).map_err(|source| StoriesError::Io {
                        path: p.display().to_string(),
                        source,
                    })?;
                    Ok((p.display().to_string(), text))
                }
            }
        };
        let list = |name, builtin| -> Result<WordList, StoriesError> {
            let (path, text) = read(name, builtin)?;
            Ok(WordList::parse(&path, &text)?)
        };
        let verbs = list("verbs.txt", BUILTIN_VERBS)?;
        let nouns = list("nouns.txt", BUILTIN_NOUNS)?;
        let adjectives = list("adjectives.txt", BUILTIN_ADJECTIVES)?;
        let function_words = list("function_words.txt", BUILTIN_FUNCTION_WORDS)?;
        let (path, text) = read("features.txt", BUILTIN_FEATURES)?;
        let features = parse_features(&path, &text)?;
        let mut word_ids: HashMap<String, u32, _> = HashMap::default();
        let mut lemmas: HashMap<String, Vec<u32>> = HashMap::new();
        for list in [&verbs, &nouns, &adjectives, &function_words] {
            for word in &list.words {
                let next = word_ids.len() as u32;
                let id = *word_ids.entry(word.clone()).or_insert(next);
                for form in list.forms(word) {
                    let entry = lemmas.entry(form).or_default();
                    if !entry.contains(&id) {
                        entry.push(id);
                    }
                }
            }
        }
        let mut form_lemmas = Vec::new();
        let mut forms = HashMap::default();
        for (form, ids) in lemmas {
            let start = form_lemmas.len() as u32;
            form_lemmas.extend(ids);
            forms.insert(form.into_boxed_str(), (start, form_lemmas.len() as u32));
        }
        Ok(Vocabulary {
            verbs,
            nouns,
            adjectives,
            features,
            forms,
            form_lemmas,
            word_ids,
        })
    }

    /// Whether `text` uses `word` in some inflection: the forms the word lists give it (irregular
    /// ones included), else its regular forms.
    pub fn uses_word(&self, text: &str, word: &str) -> bool {
        match self.word_ids.get(word) {
            Some(&id) => words::tokens(text).any(|t| {
                self.lemmas_of(&t)
                    .is_some_and(|lemmas| lemmas.contains(&id))
            }),
            None => {
                let forms = words::regular_forms(word);
                words::tokens(text).any(|t| forms.iter().any(|f| *f == t))
            }
        }
    }

    /// The ids of the words `form` is a form of (`None`: not a word a young child knows).
    fn lemmas_of(&self, form: &str) -> Option<&[u32]> {
        let &(start, end) = self.forms.get(form)?;
        Some(&self.form_lemmas[start as usize..end as usize])
    }
}

fn parse_features(path: &str, text: &str) -> Result<Vec<Feature>, StoriesError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match line.split_once('|') {
            Some((name, instruction))
                if !name.trim().is_empty() && !instruction.trim().is_empty() =>
            {
                out.push(Feature {
                    name: name.trim().to_string(),
                    instruction: instruction.trim().to_string(),
                })
            }
            _ => {
                return Err(StoriesError::BadFeature {
                    path: path.into(),
                    line: i + 1,
                    text: raw.into(),
                })
            }
        }
    }
    Ok(out)
}

pub struct Stories {
    template: Template,
    vocab: Vocabulary,
    max_features: usize,
    strict_words: bool,
}

impl Stories {
    pub fn new(
        template: Template,
        vocab: Vocabulary,
        max_features: usize,
        strict_words: bool,
    ) -> Stories {
        Stories {
            template,
            vocab,
            max_features,
            strict_words,
        }
    }
}

row! {
    #[derive(Debug, Clone, Serialize)]
    pub struct StoryConstraints {
        pub verb: String,
        pub noun: String,
        pub adjective: String,
        pub features: Vec<String>,
    }
}

row! {
    #[derive(Debug, Clone)]
    pub struct StoryChecks {
        /// All three required words appear (in some inflection).
        pub words_used: bool,
        pub missing_words: Vec<String>,
        pub dialogue_requested: bool,
        pub has_dialogue: bool,
        /// Share of word tokens that are not a form of a vocabulary or function word.
        pub oov_share: f64,
        pub word_count: u64,
        /// The first three words, lowercased, without punctuation.
        pub opening: String,
    }
}

/// Quoted speech: a pair of straight or curly double quotes around something.
pub fn has_dialogue(text: &str) -> bool {
    let straight = text.matches('"').count() >= 2;
    let curly = text.contains('“') && text.contains('”');
    straight || curly
}

impl Stories {
    /// The checks of one answer (see [`Corpus::check`]).
    pub fn verify(&self, c: &StoryConstraints, text: &str) -> Result<StoryChecks, Drop> {
        // One pass over the words: required words seen, words outside the vocabulary, opening.
        let required = [&c.verb, &c.noun, &c.adjective];
        let ids = required.map(|w| self.vocab.word_ids.get(w.as_str()).copied());
        let mut used = [false; 3];
        let (mut tokens, mut oov) = (0usize, 0usize);
        let mut opening: Vec<Cow<str>> = Vec::with_capacity(3);
        for token in words::tokens(text) {
            tokens += 1;
            match self.vocab.lemmas_of(&token) {
                Some(lemmas) => {
                    for (used, id) in used.iter_mut().zip(ids) {
                        *used |= id.is_some_and(|id| lemmas.contains(&id));
                    }
                }
                None => oov += 1,
            }
            if opening.len() < 3 {
                opening.push(token);
            }
        }
        let missing_words: Vec<String> = required
            .into_iter()
            .zip(used)
            .filter(|&(_, used)| !used)
            .map(|(word, _)| word.clone())
            .collect();
        if self.strict_words && !missing_words.is_empty() {
            return Err(Drop::new(
                DropReason::MissingWords,
                format!("does not use {}", missing_words.join(", ")),
            ));
        }
        Ok(StoryChecks {
            words_used: missing_words.is_empty(),
            missing_words,
            dialogue_requested: c.features.iter().any(|f| f == DIALOGUE),
            has_dialogue: has_dialogue(text),
            oov_share: if tokens == 0 {
                0.0
            } else {
                oov as f64 / tokens as f64
            },
            word_count: text.split_whitespace().count() as u64,
            opening: opening.join(" "),
        })
    }
}

impl Corpus for Stories {
    type Constraints = StoryConstraints;
    type Checks = StoryChecks;

    fn kind(&self) -> &'static str {
        "tinystories"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, _slot: u64, rng: &mut ChaCha8Rng) -> StoryConstraints {
        let pick = |list: &WordList, rng: &mut ChaCha8Rng| {
            list.words
                .choose(rng)
                .expect("word lists are never empty")
                .clone()
        };
        let verb = pick(&self.vocab.verbs, rng);
        let noun = pick(&self.vocab.nouns, rng);
        let adjective = pick(&self.vocab.adjectives, rng);
        let k = rng.random_range(0..=self.max_features.min(self.vocab.features.len()));
        let mut chosen: Vec<&Feature> = self.vocab.features.choose_multiple(rng, k).collect();
        chosen.shuffle(rng);
        StoryConstraints {
            verb,
            noun,
            adjective,
            features: chosen.iter().map(|f| f.name.clone()).collect(),
        }
    }

    fn prompt_vars(&self, c: &StoryConstraints) -> Vec<(&'static str, String)> {
        let instructions: Vec<&str> = c
            .features
            .iter()
            .filter_map(|name| self.vocab.features.iter().find(|f| &f.name == name))
            .map(|f| f.instruction.as_str())
            .collect();
        let features = if instructions.is_empty() {
            String::new()
        } else {
            format!(
                " The story should have the following features: {}.",
                instructions.join(", ")
            )
        };
        vec![
            ("verb", c.verb.clone()),
            ("noun", c.noun.clone()),
            ("adjective", c.adjective.clone()),
            ("features", features),
        ]
    }

    fn check(
        &self,
        c: &StoryConstraints,
        text: &str,
    ) -> impl std::future::Future<Output = Result<StoryChecks, Drop>> + Send {
        std::future::ready(self.verify(c, text))
    }

    fn word_bounds(&self) -> (usize, usize) {
        (40, 1200)
    }

    fn typical_completion_tokens(&self) -> u64 {
        // TinyStories average about 175 words ≈ 230 tokens; 3–5 paragraph prompts run longer.
        350
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec![
            "words_used",
            "dialogue_requested",
            "has_dialogue",
            "oov_share",
            "word_count",
            "opening",
        ]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        summarize_stories(df)
    }
}

fn summarize_stories(df: &DataFrame) -> PolarsResult<Value> {
    let n = df.height();
    let used = df.column("words_used")?.bool()?.clone();
    let asked = df.column("dialogue_requested")?.bool()?.clone();
    let has = df.column("has_dialogue")?.bool()?.clone();
    let oov = df.column("oov_share")?.f64()?.clone();
    let words = df.column("word_count")?.i64()?.clone();
    let openings = df.column("opening")?.str()?.clone();
    let share = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    let used_count = used.iter().filter(|v| *v == Some(true)).count();
    let (mut asked_count, mut asked_ok) = (0usize, 0usize);
    for (a, h) in asked.iter().zip(has.iter()) {
        if a == Some(true) {
            asked_count += 1;
            asked_ok += usize::from(h == Some(true));
        }
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in openings.iter().flatten() {
        *counts.entry(o).or_default() += 1;
    }
    let mut top: Vec<(&str, usize)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    top.truncate(10);
    Ok(json!({
        "stories": n,
        "words_used_share": share(used_count),
        "dialogue_requested": asked_count,
        "dialogue_present_when_requested_share": if asked_count == 0 { Value::Null } else { json!(asked_ok as f64 / asked_count as f64) },
        "mean_oov_share": oov.mean(),
        "mean_word_count": words.mean(),
        "top_openings": top.iter().map(|(o, c)| json!({"opening": o, "count": c, "share": share(*c)})).collect::<Vec<_>>(),
        "top10_openings_share": share(top.iter().map(|(_, c)| c).sum()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashSet;

    fn stories() -> Stories {
        let template = Template::parse("tinystories.txt", BUILTIN_TEMPLATE).unwrap();
        Stories::new(template, Vocabulary::load(None).unwrap(), 3, false)
    }

    #[test]
    fn the_builtin_vocabulary_has_about_1500_words_split_three_ways() {
        let v = Vocabulary::load(None).unwrap();
        let total = v.verbs.words.len() + v.nouns.words.len() + v.adjectives.words.len();
        assert!((1400..=1700).contains(&total), "{total} words");
        assert!(v.features.iter().any(|f| f.name == DIALOGUE));
        let unique: HashSet<&String> = v
            .verbs
            .words
            .iter()
            .chain(&v.nouns.words)
            .chain(&v.adjectives.words)
            .collect();
        assert!(
            unique.len() as f64 > 0.97 * total as f64,
            "lists should barely overlap"
        );
    }

    #[test]
    fn the_prompt_names_the_three_words_and_the_features() {
        let s = stories();
        let c = StoryConstraints {
            verb: "decorate".into(),
            noun: "thunder".into(),
            adjective: "ancient".into(),
            features: vec!["dialogue".into(), "bad_ending".into()],
        };
        let vars = s.prompt_vars(&c);
        let values: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let prompt = s.template().render(&values).unwrap();
        // The paper's example prompt (TinyStories §2, quoted in ../shared/seeds) has these parts.
        assert!(
            prompt.contains(
                "the verb \"decorate\", the noun \"thunder\" and the adjective \"ancient\""
            ),
            "{prompt}"
        );
        assert!(
            prompt.contains(
                "the story should contain at least one dialogue, the story has a bad ending."
            ),
            "{prompt}"
        );
        assert!(
            prompt.ends_with("Remember to only use simple words!"),
            "{prompt}"
        );
    }

    #[test]
    fn sampling_is_a_function_of_the_rng_seed() {
        let s = stories();
        let a = s.sample(0, &mut ChaCha8Rng::seed_from_u64(7));
        let b = s.sample(0, &mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(
            (a.verb.clone(), a.noun.clone(), a.features.clone()),
            (b.verb, b.noun, b.features)
        );
        let distinct: HashSet<String> = (0..200)
            .map(|i| s.sample(0, &mut ChaCha8Rng::seed_from_u64(i)).noun)
            .collect();
        assert!(
            distinct.len() > 150,
            "200 draws should give many different nouns, got {}",
            distinct.len()
        );
    }

    #[test]
    fn checks_find_inflected_words_dialogue_and_unknown_words() {
        let s = stories();
        let c = StoryConstraints {
            verb: "decorate".into(),
            noun: "tree".into(),
            adjective: "happy".into(),
            features: vec!["dialogue".into()],
        };
        let text = "Once upon a time, Tim decorated a big tree. \"It is pretty!\" she said. She was happier than ever. Zyxwv.";
        let k = s.verify(&c, text).unwrap();
        assert!(k.words_used && k.missing_words.is_empty());
        assert!(k.dialogue_requested && k.has_dialogue);
        assert_eq!(k.opening, "once upon a");
        // "tim" (a name) and "zyxwv" are outside the vocabulary; 20 tokens in all.
        assert_eq!(words::tokens(text).count(), 20);
        assert!((k.oov_share - 2.0 / 20.0).abs() < 1e-9, "{}", k.oov_share);
        let strict = Stories::new(s.template.clone(), s.vocab.clone(), 3, true);
        let drop = strict
            .verify(
                &StoryConstraints {
                    verb: "swim".into(),
                    ..c
                },
                text,
            )
            .unwrap_err();
        assert_eq!(drop.reason, DropReason::MissingWords);
    }
}
