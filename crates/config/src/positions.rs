//! Where each item sits in the file.
//!
//! serde_yaml's `Value` keeps no positions, so the same text is parsed a
//! second time with yaml-rust2's marked events to map item paths such as
//! `listeners[1].role` to a 1-based line and column.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Item path → (line, column), both 1-based.
#[derive(Debug, Default)]
pub struct Positions {
    map: HashMap<String, (usize, usize)>,
}

impl Positions {
    /// Indexes `text`; a text that does not parse yields an empty index.
    pub fn index(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        // A syntax error is reported by serde_yaml; positions are best effort.
        let _ = parser.load(&mut builder, false);
        Self { map: builder.map }
    }

    /// The position of `path`, or of its closest ancestor that is known.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut path = path;
        loop {
            if let Some(pos) = self.map.get(path) {
                return Some(*pos);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    /// In a mapping: the key waiting for its value, if any.
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    map: HashMap<String, (usize, usize)>,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// The path of the node now starting, or `None` if it is a mapping key.
    fn node_path(&mut self, scalar: Option<&str>) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    *key = Some(scalar.unwrap_or("?").to_owned());
                    None
                }
            },
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.map.entry(path.to_owned()).or_insert((mark.line(), mark.col() + 1));
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                let parent = match self.stack.last() {
                    Some(Frame::Map { path, key: None }) => Some(path.clone()),
                    _ => None,
                };
                match self.node_path(Some(&value)) {
                    Some(path) => self.record(&path, mark),
                    // A key: point the item at its key until the value is seen.
                    None => self.record(&join(&parent.unwrap_or_default(), &value), mark),
                }
            }
            Event::MappingStart(..) => {
                let path = self.node_path(None).unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(None).unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            // A reused node (`*name`) takes a place like any other value, so
            // the items after it keep their own index and position.
            Event::Alias(_) => {
                if let Some(path) = self.node_path(None) {
                    self.record(&path, mark);
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Positions;

    const TEXT: &str =
        "health:\n  interval: 1s\nlisteners:\n  - name: rw\n    role: primary\n  - name: ro\n    role: bogus\n";

    #[test]
    fn finds_items_by_path() {
        let p = Positions::index(TEXT);
        assert_eq!(p.find("health.interval"), Some((2, 3)));
        assert_eq!(p.find("listeners[1].role"), Some((7, 5)));
        assert_eq!(p.find("listeners[0].name"), Some((4, 5)));
    }

    #[test]
    fn an_alias_takes_its_place() {
        let text = "listeners:\n  - &l {name: rw, role: primary}\n  - *l\n  - name: ro\n    role: bogus\n";
        let p = Positions::index(text);
        assert_eq!(p.find("listeners[1]"), Some((3, 5)));
        assert_eq!(p.find("listeners[2].role"), Some((5, 5)), "the item after an alias keeps its own position");
    }

    #[test]
    fn falls_back_to_the_closest_ancestor() {
        let p = Positions::index(TEXT);
        assert_eq!(p.find("listeners[1].balance"), p.find("listeners[1]"));
        assert!(p.find("listeners[1]").is_some());
    }
}
