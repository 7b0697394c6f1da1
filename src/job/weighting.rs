//! The A1111 prompt-weighting syntax (`prompt_weighting` in the contract): `(words)` weighs its
//! text by 1.1, `[words]` by 1/1.1, `(words:1.3)` by 1.3, brackets nest by multiplying, `\(` `\)`
//! `\[` `\]` `\\` are the literal characters, and `BREAK` (upper case, a word of its own) ends the
//! current 75-token chunk. [`parse`] turns a prompt into [`Piece`]s: texts with their weight, and
//! breaks. What the weights do to the embeddings is the pipeline's business (`pipeline/prompt.rs`,
//! docs/model-notes.md §2).
//!
//! The parse is AUTOMATIC1111's `modules/prompt_parser.py` `parse_prompt_attention`, the same
//! function diffusers' community pipelines `lpw_stable_diffusion.py` / `lpw_stable_diffusion_xl.py`
//! ship: a left-to-right scan over the alternatives of its `re_attention` expression, in its order;
//! an unmatched `)` or `]` is text; brackets still open at the end apply (round ones first, outermost
//! first, then square ones); neighbouring texts of equal weight are joined (they are tokenized as one
//! text). Weights are products in `f64`, multiplied in the order Python multiplies them, so they equal
//! the reference's to the bit (tests/it/weighting.rs checks a corpus).
//!
//! Where we depart, both for inputs A1111 mishandles: a weight that is not a number (`(a:1.2.3)`,
//! where Python's `float()` raises) and a weight outside `0..=`[`MAX_WEIGHT`] (nesting multiplies:
//! 25 levels of `(…)` pass 10) are a [`WeightError`], which the contract turns into an
//! `invalid_input` rejection; and `BREAK` inside brackets still breaks (A1111 multiplies its `-1`
//! marker by the bracket and then encodes the word "break" with weight −1.1).
//!
//! Pure: no model, no I/O. Every input gives pieces or an error, never a panic (the property test
//! below).

/// How a job's prompts are read: the `prompt_weighting` field of the contract.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum PromptWeighting {
    /// The A1111 syntax ([`parse`]), weights applied as A1111's "Original" emphasis does.
    #[default]
    A1111,
    /// The text is encoded literally, as diffusers encodes it (brackets are characters).
    None,
}

impl PromptWeighting {
    pub const ALL: [PromptWeighting; 2] = [Self::A1111, Self::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::A1111 => "a1111",
            Self::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for PromptWeighting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest effective weight a text may get. A1111 has no bound, but past about 2 images break
/// down, and an unbounded product of nested brackets reaches infinity (`(` × 8000 is 1.1⁸⁰⁰⁰);
/// 10 leaves every weight people write (24 nested `(…)` are 9.85) and refuses the rest.
pub const MAX_WEIGHT: f64 = 10.0;
/// `(words)`: `round_bracket_multiplier` in A1111's `parse_prompt_attention`.
const ROUND: f64 = 1.1;
/// `[words]`: `square_bracket_multiplier = 1 / 1.1` there.
const SQUARE: f64 = 1.0 / 1.1;

/// A part of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text tokenized on its own, every token of it weighted `weight`.
    Text { text: String, weight: f64 },
    /// `BREAK`: the current chunk ends here (padded), the next text starts a new one.
    Break,
}

/// A prompt the weighting syntax refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightError {
    /// `(text:WEIGHT)` whose WEIGHT is digits and dots but not a number.
    #[error("weight `{literal}` is not a number")]
    Number { literal: String },
    /// A text's weight (the product of its brackets) outside `0..=MAX_WEIGHT`.
    #[error("weight {weight} of \"{text}\" is outside 0..={MAX_WEIGHT} (nested brackets multiply)")]
    Range { text: String, weight: f64 },
}

/// One entry of A1111's `res` list while parsing.
#[derive(Debug, Clone)]
enum Entry {
    Text(String, f64),
    Break,
}

/// Parses `text` as A1111 does (module docs).
///
/// # Errors
/// A weight that is not a number, or a text weighted outside `0..=`[`MAX_WEIGHT`].
pub fn parse(text: &str) -> Result<Vec<Piece>, WeightError> {
    let mut res: Vec<Entry> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Entry>, from: usize, by: f64| {
        for e in &mut res[from..] {
            if let Entry::Text(_, w) = e {
                *w *= by;
            }
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match (c, next) {
            // `\(`, `\)`, `\[`, `\]`, `\\`: the character; a lone `\`: nothing (`text[1:]` of it).
            ('\\', Some(n @ ('(' | ')' | '[' | ']' | '\\'))) => {
                res.push(Entry::Text(n.to_string(), 1.0));
                i += 2;
            }
            ('\\', _) => {
                res.push(Entry::Text(String::new(), 1.0));
                i += 1;
            }
            ('(', _) => {
                round.push(res.len());
                i += 1;
            }
            ('[', _) => {
                square.push(res.len());
                i += 1;
            }
            (':', _) => match weight_close(&chars, i) {
                // `:([+-]?[.\d]+)\)`: closes the innermost `(` with that weight; with no `(` open
                // the whole match is text.
                Some(end) => {
                    let literal: String = chars[i + 1..end - 1].iter().collect();
                    match round.pop() {
                        Some(from) => {
                            let w = literal
                                .parse::<f64>()
                                .map_err(|_| WeightError::Number { literal })?;
                            multiply(&mut res, from, w);
                        }
                        None => plain(&mut res, &chars[i..end]),
                    }
                    i = end;
                }
                None => {
                    res.push(Entry::Text(":".into(), 1.0));
                    i += 1;
                }
            },
            (')', _) => {
                match round.pop() {
                    Some(from) => multiply(&mut res, from, ROUND),
                    None => plain(&mut res, &[')']),
                }
                i += 1;
            }
            (']', _) => {
                match square.pop() {
                    Some(from) => multiply(&mut res, from, SQUARE),
                    None => plain(&mut res, &[']']),
                }
                i += 1;
            }
            // `[^\\()\[\]:]+`: a run of ordinary characters.
            _ => {
                let end = (i..chars.len())
                    .find(|&j| matches!(chars[j], '\\' | '(' | ')' | '[' | ']' | ':'))
                    .unwrap_or(chars.len());
                plain(&mut res, &chars[i..end]);
                i = end;
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push(Entry::Text(String::new(), 1.0));
    }
    let pieces = merge(res);
    for p in &pieces {
        if let Piece::Text { text, weight } = p
            && !text.is_empty()
            && !(0.0..=MAX_WEIGHT).contains(weight)
        {
            return Err(WeightError::Range {
                text: text.chars().take(40).collect(),
                weight: *weight,
            });
        }
    }
    Ok(pieces)
}

/// The end (exclusive) of `:([+-]?[.\d]+)\)` starting at `chars[i] == ':'`, if it matches there.
fn weight_close(chars: &[char], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if matches!(chars.get(j), Some('+' | '-')) {
        j += 1;
    }
    let digits = j;
    // `\d` is any decimal digit to Python; non-ASCII ones then fail our number parse (refused,
    // where Python's `float()` would read them).
    while matches!(chars.get(j), Some(c) if *c == '.' || c.is_numeric()) {
        j += 1;
    }
    (j > digits && chars.get(j) == Some(&')')).then_some(j + 1)
}

/// A run of text (weight 1), split at every `BREAK` as A1111's `re.split(r"\s*\bBREAK\b\s*", …)`:
/// the word with the whitespace around it goes, a break marker stands in its place.
fn plain(res: &mut Vec<Entry>, run: &[char]) {
    let mut start = 0;
    let mut k = 0;
    while k + 5 <= run.len() {
        let word = run[k..k + 5] == ['B', 'R', 'E', 'A', 'K'];
        let bounded =
            (k == 0 || !is_word(run[k - 1])) && run.get(k + 5).is_none_or(|&c| !is_word(c));
        if !(word && bounded) {
            k += 1;
            continue;
        }
        // The match starts where the whitespace before the word starts (not before the last one).
        let mut left = k;
        while left > start && is_space(run[left - 1]) {
            left -= 1;
        }
        let mut right = k + 5;
        while right < run.len() && is_space(run[right]) {
            right += 1;
        }
        res.push(Entry::Text(run[start..left].iter().collect(), 1.0));
        res.push(Entry::Break);
        start = right;
        k = right;
    }
    res.push(Entry::Text(run[start..].iter().collect(), 1.0));
}

/// Python's `\w` for `str` patterns: alphanumeric or `_`.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Python's `\s` for `str` patterns: `str.isspace()`, Unicode white space plus the information
/// separators U+001C..U+001F.
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A1111's "merge runs of identical weights": neighbouring texts of equal weight become one text.
fn merge(res: Vec<Entry>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(res.len());
    for e in res {
        match (e, out.last_mut()) {
            (Entry::Text(t, w), Some(Piece::Text { text, weight })) if *weight == w => {
                text.push_str(&t);
            }
            (Entry::Text(text, weight), _) => out.push(Piece::Text { text, weight }),
            (Entry::Break, _) => out.push(Piece::Break),
        }
    }
    out
}

/// Whether the pieces weigh every text 1 and break nowhere: the prompt then encodes as its literal
/// text would, except for escapes (`\(` is `(`), which [`literal_text`] resolves.
pub fn is_plain(pieces: &[Piece]) -> bool {
    pieces
        .iter()
        .all(|p| matches!(p, Piece::Text { weight, .. } if *weight == 1.0))
}

/// The text of plain pieces, joined (escapes resolved).
pub fn literal_text(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Text { text, .. } => Some(text.as_str()),
            Piece::Break => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn t(text: &str, weight: f64) -> Piece {
        Piece::Text {
            text: text.into(),
            weight,
        }
    }

    fn p(text: &str) -> Vec<Piece> {
        parse(text).unwrap()
    }

    // The cases of `parse_prompt_attention`'s docstring (A1111 `modules/prompt_parser.py`).
    #[test]
    fn the_reference_docstring_examples_parse_alike() {
        assert_eq!(p("normal text"), vec![t("normal text", 1.0)]);
        assert_eq!(
            p("an (important) word"),
            vec![t("an ", 1.0), t("important", 1.1), t(" word", 1.0)]
        );
        assert_eq!(p("(unbalanced"), vec![t("unbalanced", 1.1)]);
        assert_eq!(p(r"\(literal\]"), vec![t("(literal]", 1.0)]);
        assert_eq!(
            p("(unnecessary)(parens)"),
            vec![t("unnecessaryparens", 1.1)]
        );
        assert_eq!(
            p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            vec![
                t("a ", 1.0),
                t("house", 1.5730000000000004),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641000000000006),
                t(".", 1.1),
            ]
        );
    }

    #[test]
    fn square_brackets_divide_and_unmatched_closers_are_text() {
        assert_eq!(p("[a]"), vec![t("a", 1.0 / 1.1)]);
        assert_eq!(p("a) b]"), vec![t("a) b]", 1.0)]);
        // With no `(` open, `:1.2)` is text; `:` alone is text; both join their neighbours.
        assert_eq!(p("a:1.2) b: c"), vec![t("a:1.2) b: c", 1.0)]);
        // `(a:1.2]`: the `]` closes nothing, the `(` stays open.
        assert_eq!(p("(a:1.2]"), vec![t("a:1.2]", 1.1)]);
    }

    #[test]
    fn escapes_and_lone_backslashes() {
        assert_eq!(p(r"\\ \( \) \[ \]"), vec![t(r"\ ( ) [ ]", 1.0)]);
        // A lone backslash is dropped (A1111 appends `text[1:]` of the one-character match).
        assert_eq!(p(r"a\b"), vec![t("ab", 1.0)]);
        assert_eq!(p("a\\"), vec![t("a", 1.0)]);
        // An escaped bracket inside brackets is text of that weight.
        assert_eq!(p(r"(\(x\):2)"), vec![t("(x)", 2.0)]);
    }

    #[test]
    fn weights_multiply_in_the_reference_order() {
        // ((x:1.3)): 1.3 × 1.1; unclosed brackets apply at the end, round ones first.
        assert_eq!(p("((x:1.3))"), vec![t("x", 1.3 * 1.1)]);
        assert_eq!(p("[(x"), vec![t("x", 1.1 * (1.0 / 1.1))]);
        assert_eq!(p("(x:+.5)"), vec![t("x", 0.5)]);
        assert_eq!(p("(x:0)"), vec![t("x", 0.0)]);
    }

    #[test]
    fn break_ends_a_chunk_where_it_is_a_word() {
        assert_eq!(
            p("a red fox BREAK  a blue sky"),
            vec![t("a red fox", 1.0), Piece::Break, t("a blue sky", 1.0)]
        );
        assert_eq!(p("BREAK"), vec![t("", 1.0), Piece::Break, t("", 1.0)]);
        // Not a word of its own, or not upper case: text.
        assert_eq!(
            p("BREAKfast Break _BREAK"),
            vec![t("BREAKfast Break _BREAK", 1.0)]
        );
        // Inside brackets it still breaks (A1111 would encode the word "break" at −1.1).
        assert_eq!(
            p("(a BREAK b)"),
            vec![t("a", 1.1), Piece::Break, t("b", 1.1)]
        );
        assert_eq!(
            p("a BREAK BREAK b"),
            vec![
                t("a", 1.0),
                Piece::Break,
                t("", 1.0),
                Piece::Break,
                t("b", 1.0)
            ]
        );
    }

    #[test]
    fn the_empty_prompt_is_one_empty_text() {
        assert_eq!(p(""), vec![t("", 1.0)]);
        assert_eq!(p("()"), vec![t("", 1.0)]);
        assert!(is_plain(&p("")));
    }

    #[test]
    fn weights_that_are_not_numbers_or_out_of_bounds_are_refused() {
        assert_eq!(
            parse("(a:1.2.3)"),
            Err(WeightError::Number {
                literal: "1.2.3".into()
            })
        );
        assert!(matches!(parse("(a:.)"), Err(WeightError::Number { .. })));
        assert!(matches!(parse("(a:-1)"), Err(WeightError::Range { .. })));
        assert!(matches!(parse("(a:10.5)"), Err(WeightError::Range { .. })));
        let deep = format!("{}a{}", "(".repeat(25), ")".repeat(25));
        assert!(matches!(parse(&deep), Err(WeightError::Range { .. })));
        let fine = format!("{}a{}", "(".repeat(24), ")".repeat(24));
        assert!(parse(&fine).is_ok());
        // A huge literal times zero is NaN: refused, never passed on.
        let nan = format!("(((a:{}):{}):0)", "9".repeat(400), "9".repeat(400));
        assert!(matches!(parse(&nan), Err(WeightError::Range { .. })));
        // A weight on nothing has no effect and is not checked.
        assert!(parse("(:99)").is_ok());
    }

    #[test]
    fn plain_pieces_give_back_the_literal_text() {
        let pieces = p(r"a photo, 4:3 of \(x\)");
        assert!(is_plain(&pieces));
        assert_eq!(literal_text(&pieces), "a photo, 4:3 of (x)");
        assert!(!is_plain(&p("a (b)")));
        assert!(!is_plain(&p("a BREAK b")));
    }

    #[test]
    fn contract_names_round_trip() {
        for k in PromptWeighting::ALL {
            assert_eq!(PromptWeighting::parse(k.as_str()), Some(k));
        }
        assert_eq!(PromptWeighting::parse("A1111"), None);
    }

    /// Strings of the syntax's own characters (and some others), where the parser's decisions are.
    fn syntax() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ab (:)\\[\\]\\\\0-9.+-]{0,80}",
            "((BREAK|\\(|\\)|\\[|\\]|:|\\\\|[0-9.]{1,4}|word| |\u{1c}|é|_)){0,40}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(crate::job::message::fuzz::config())]

        /// Every input: pieces with every non-empty text weighted within bounds, or an error;
        /// never a panic. The pieces keep every character that is not syntax.
        #[test]
        fn any_prompt_parses_or_is_refused(s in syntax()) {
            match parse(&s) {
                Ok(pieces) => {
                    prop_assert!(!pieces.is_empty());
                    for piece in &pieces {
                        if let Piece::Text { text, weight } = piece {
                            prop_assert!(text.is_empty() || (0.0..=MAX_WEIGHT).contains(weight));
                        }
                    }
                    let kept: String = literal_text(&pieces);
                    let letters = |x: &str| x.chars().filter(|c| c.is_alphabetic() && *c != 'B'
                        && *c != 'R' && *c != 'E' && *c != 'A' && *c != 'K').count();
                    prop_assert_eq!(letters(&kept), letters(&s));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
