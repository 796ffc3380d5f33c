//! Topic filters: which topics a flow's `topic` column takes, by the rules of MQTT 3.1.1.

use std::fmt;

/// A valid MQTT topic filter (MQTT 3.1.1, section 4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("a topic filter cannot be empty".to_owned());
        }
        if filter.len() > 65_535 {
            return Err("a topic filter is at most 65535 bytes".to_owned());
        }
        if filter.contains('\0') {
            return Err("a topic filter cannot contain NUL".to_owned());
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err("'#' must be a whole level and the last one".to_owned());
            }
            if level.contains('+') && *level != "+" {
                return Err("'+' must be a whole level".to_owned());
            }
        }
        Ok(TopicFilter(filter.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// MQTT matching, including the rule that a filter starting with a wildcard does not match
    /// topics starting with `$` (such as `$SYS/...`).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for level in self.0.split('/') {
            match (level, topic_levels.next()) {
                // `sport/#` also matches `sport` itself: '#' covers the parent level.
                ("#", _) => return true,
                ("+", Some(_)) => {}
                (l, Some(t)) if l == t => {}
                _ => return false,
            }
        }
        topic_levels.next().is_none()
    }
}

impl TopicFilter {
    /// Where its wildcards are: each level as `+`, `#`, or `L` for a literal. Two different
    /// filters of one shape never match the same topic (they differ in a literal level, which
    /// both require), which is what lets them share a Subscription Identifier.
    pub fn shape(&self) -> String {
        self.0
            .split('/')
            .map(|level| match level {
                "+" | "#" => level,
                _ => "L",
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("sensors/aht10", "sensors/aht10", true)]
    #[case("sensors/+", "sensors/aht10", true)]
    #[case("sensors/+", "sensors/aht10/x", false)]
    #[case("sensors/#", "sensors", true)]
    #[case("sensors/#", "sensors/a/b/c", true)]
    #[case("#", "anything/at/all", true)]
    #[case("+/+", "a/b", true)]
    #[case("+", "/a", false)]
    #[case("+/a", "/a", true)]
    #[case("a/+/c", "a//c", true)]
    #[case("#", "$SYS/broker/load", false)]
    #[case("+/broker", "$SYS/broker", false)]
    #[case("$SYS/#", "$SYS/broker", true)]
    #[case("a/b", "a/b/", false)]
    #[case("a/b", "A/b", false)]
    fn topic_filters_match_by_mqtt_rules(#[case] filter: &str, #[case] topic: &str, #[case] hit: bool) {
        assert_eq!(TopicFilter::parse(filter).unwrap().matches(topic), hit, "{filter} vs {topic}");
    }

    #[test]
    fn filters_of_one_shape_never_match_one_topic() {
        let shape = |f: &str| TopicFilter::parse(f).unwrap().shape();
        assert_eq!(shape("devices/+/alarm"), "L/+/L");
        assert_eq!(shape("devices/7/#"), shape("devices/8/#"));
        assert_ne!(shape("a/#"), shape("a/b/#"), "these two overlap, so they differ");
        assert_ne!(shape("a/+"), shape("a/b"));
    }

    #[rstest]
    #[case("")]
    #[case("a/#/b")]
    #[case("a#")]
    #[case("a/b+")]
    #[case("a\0b")]
    fn invalid_topic_filters_are_refused(#[case] filter: &str) {
        assert!(TopicFilter::parse(filter).is_err());
    }
}
