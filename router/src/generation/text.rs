//! Text-level post-processing of a token stream, for streaming and not:
//! stop strings matched across token boundaries (never included in the
//! output), and DeepSeek-R1's reasoning split at `</think>`. Both hold back
//! just the tail that could still turn into their marker, so streamed text
//! is never taken back.

/// Length of the longest suffix of `text` that is a proper prefix of
/// `marker` (on character boundaries): text that must wait for more.
fn pending_prefix(text: &str, marker: &str) -> usize {
    marker.char_indices().map(|(i, _)| i).filter(|&k| k > 0 && text.ends_with(&marker[..k])).max().unwrap_or(0)
}

/// Stop strings over a stream of text pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds text; returns what may be emitted now, and whether a stop string
    /// was hit (the text then ends just before it, and nothing follows).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self.stops.iter().map(|s| pending_prefix(&self.held, s)).max().unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The held-back tail, once the stream has ended without a stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Splits DeepSeek-R1 output into reasoning (up to `</think>`) and content
/// (after it). R1 often omits the opening `<think>` (the chat template
/// already wrote it), so everything before `</think>` is reasoning either
/// way; a stream that never closes it is all reasoning.
#[derive(Debug, Default)]
pub struct ReasoningSplitter {
    held: String,
    /// Whether anything was seen yet (a leading `<think>` is dropped).
    started: bool,
    closed: bool,
}

impl ReasoningSplitter {
    /// Adds text; returns `(reasoning, content)` to emit now.
    pub fn push(&mut self, piece: &str) -> (String, String) {
        if self.closed {
            return (String::new(), piece.to_string());
        }
        self.held.push_str(piece);
        if !self.started {
            if THINK_OPEN.starts_with(self.held.as_str()) && self.held.len() < THINK_OPEN.len() {
                return (String::new(), String::new()); // could still be "<think>"
            }
            self.started = true;
            if let Some(rest) = self.held.strip_prefix(THINK_OPEN) {
                self.held = rest.to_string();
            }
        }
        if let Some(pos) = self.held.find(THINK_CLOSE) {
            self.closed = true;
            let content = self.held[pos + THINK_CLOSE.len()..].to_string();
            self.held.truncate(pos);
            return (std::mem::take(&mut self.held), content);
        }
        let keep = pending_prefix(&self.held, THINK_CLOSE);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, String::new())
    }

    /// What is left once the stream ends: reasoning that never closed.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run_stop(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out += &t;
            if hit {
                return (out, true);
            }
        }
        out += &m.flush();
        (out, false)
    }

    #[test]
    fn stops_across_token_boundaries_and_excludes_the_stop() {
        assert_eq!(run_stop(&["END"], &["hello E", "N", "D world"]), ("hello ".into(), true));
        assert_eq!(run_stop(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run_stop(&["xyz"], &["ab", "xy", "q"]), ("abxyq".into(), false));
        // The earliest of several stops wins.
        assert_eq!(run_stop(&["cd", "b"], &["abcd"]), ("a".into(), true));
        assert_eq!(run_stop(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }

    #[test]
    fn held_text_is_only_what_could_become_a_stop() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST"), ("abc ".into(), false));
        assert_eq!(m.push("X"), ("STX".into(), false));
    }

    fn split(pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::default();
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let (a, b) = s.push(p);
            r += &a;
            c += &b;
        }
        r += &s.flush();
        (r, c)
    }

    #[test]
    fn reasoning_splits_at_the_closing_tag_with_or_without_the_opening_one() {
        assert_eq!(split(&["<think>", "plan", "</think>", "answer"]), ("plan".into(), "answer".into()));
        assert_eq!(split(&["pl", "an</th", "ink>ans", "wer"]), ("plan".into(), "answer".into()));
        assert_eq!(split(&["<th", "ink>x</think>y"]), ("x".into(), "y".into()));
        assert_eq!(split(&["never closed"]), ("never closed".into(), String::new()));
        assert_eq!(split(&["a </think", "x"]), ("a </thinkx".into(), String::new()));
    }

    proptest! {
        #[test]
        fn any_split_of_the_text_gives_the_same_result(text in "[ab<>/thinkEND\\n ]{0,40}", cuts in proptest::collection::vec(0usize..40, 0..6)) {
            let mut idx: Vec<usize> = cuts.into_iter().filter(|&c| c <= text.len()).collect();
            idx.sort();
            idx.dedup();
            let mut pieces = Vec::new();
            let mut last = 0;
            for i in idx {
                pieces.push(&text[last..i]);
                last = i;
            }
            pieces.push(&text[last..]);
            prop_assert_eq!(run_stop(&["END", "\n\n"], &pieces), run_stop(&["END", "\n\n"], &[text.as_str()]));
            prop_assert_eq!(split(&pieces), split(&[text.as_str()]));
        }
    }
}
