//! The flows' topic filters as a tree of levels, built once per flow set, so that finding the
//! flows of a topic walks the topic's levels instead of every flow: a message costs the same
//! beside five flows or fifty thousand.
//!
//! Each node is one level of a filter: its literal children by name, one `+` child, the
//! filters that end there, and the filters that end there with `#` (which also match the
//! parent level itself: `sport/#` takes `sport`). A topic whose first level starts with `$`
//! is not matched by a filter starting with a wildcard (MQTT 3.1.1 §4.7.2).

use super::TopicFilter;
use std::collections::HashMap;

/// Values (indexes of flows) by topic filter, searched by topic.
#[derive(Debug, Clone, Default)]
pub struct TopicTree {
    root: Node,
}

#[derive(Debug, Clone, Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Filters that end here.
    here: Vec<u32>,
    /// Filters that end here with `/#` (or are `#`, at the root).
    hash: Vec<u32>,
}

impl TopicTree {
    pub fn insert(&mut self, filter: &TopicFilter, value: u32) {
        let mut node = &mut self.root;
        for level in filter.as_str().split('/') {
            node = match level {
                "#" => {
                    node.hash.push(value);
                    return;
                }
                "+" => node.plus.get_or_insert_with(Box::default),
                literal => node.literal.entry(literal.into()).or_default(),
            };
        }
        node.here.push(value);
    }

    /// Appends the values of every filter that matches `topic`, in no particular order.
    pub fn matches(&self, topic: &str, out: &mut Vec<u32>) {
        walk(&self.root, topic.split('/'), true, topic.starts_with('$'), out);
    }
}

fn walk(node: &Node, mut rest: std::str::Split<'_, char>, root: bool, dollar: bool, out: &mut Vec<u32>) {
    let wildcards = !(root && dollar);
    if wildcards {
        out.extend_from_slice(&node.hash);
    }
    match rest.next() {
        None => out.extend_from_slice(&node.here),
        Some(level) => {
            if let Some(child) = node.literal.get(level) {
                walk(child, rest.clone(), false, dollar, out);
            }
            if let (true, Some(plus)) = (wildcards, &node.plus) {
                walk(plus, rest, false, dollar, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tree(filters: &[TopicFilter]) -> TopicTree {
        let mut tree = TopicTree::default();
        for (i, filter) in filters.iter().enumerate() {
            tree.insert(filter, i as u32);
        }
        tree
    }

    fn found(tree: &TopicTree, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        tree.matches(topic, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn the_tree_finds_what_the_rules_say() {
        let filters: Vec<TopicFilter> = ["a/b", "a/+", "a/#", "#", "+/b", "$SYS/#", "a/b/c", "+"]
            .iter()
            .map(|f| TopicFilter::parse(f).unwrap())
            .collect();
        let tree = tree(&filters);
        assert_eq!(found(&tree, "a/b"), vec![0, 1, 2, 3, 4]);
        assert_eq!(found(&tree, "a"), vec![2, 3, 7], "a/# takes its parent level");
        assert_eq!(found(&tree, "$SYS/x"), vec![5], "no leading wildcard takes a $ topic");
        assert_eq!(found(&tree, "a/b/c"), vec![2, 3, 6]);
        assert_eq!(found(&tree, "x/y/z"), vec![3]);
    }

    /// Levels drawn from a few names, so that random filters and topics meet.
    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just(String::new()), Just("$s".to_owned())]
    }

    fn filter() -> impl Strategy<Value = TopicFilter> {
        let part = prop_oneof![3 => level(), 1 => Just("+".to_owned())];
        (prop::collection::vec(part, 1..5), any::<bool>()).prop_filter_map(
            "a valid filter",
            |(mut levels, hash)| {
                if hash {
                    levels.push("#".to_owned());
                }
                TopicFilter::parse(&levels.join("/")).ok()
            },
        )
    }

    proptest! {
        #[test]
        fn the_tree_agrees_with_matching_filter_by_filter(
            filters in prop::collection::vec(filter(), 1..40),
            topics in prop::collection::vec(prop::collection::vec(level(), 1..6), 1..20),
        ) {
            let tree = tree(&filters);
            for topic in topics.iter().map(|levels| levels.join("/")) {
                let linear: Vec<u32> =
                    (0..filters.len() as u32).filter(|&i| filters[i as usize].matches(&topic)).collect();
                prop_assert_eq!(found(&tree, &topic), linear, "topic {:?}", topic);
            }
        }
    }
}
