//! Request-shape checks shared by the handlers: how many topics and partitions a
//! request names, and that it names each only once. A request over a limit or with
//! a duplicate gets `InvalidRequest` before any work is done, so that the work and
//! the response a request can cause are bounded by the request's own size.

use std::collections::HashSet;

use sluice_schema::wire::ErrorCode;

use crate::limits::{PARTITIONS_PER_REQUEST_MAX, TOPICS_PER_REQUEST_MAX};
use crate::protocol::{error_response, Outgoing, ResponseSize};

/// Counts topic and partition entries of one request and refuses duplicates.
#[derive(Default)]
pub(super) struct Entries {
    topics: HashSet<String>,
    partitions: HashSet<(String, u32)>,
}

impl Entries {
    /// A topic entry (or a topic name in a list of names).
    pub(super) fn topic(&mut self, name: &str) -> Result<(), String> {
        if self.topics.len() >= TOPICS_PER_REQUEST_MAX {
            return Err(format!(
                "the request names more than {TOPICS_PER_REQUEST_MAX} topics"
            ));
        }
        if !self.topics.insert(name.to_string()) {
            return Err(format!("the request names topic '{name}' twice"));
        }
        Ok(())
    }

    /// A partition entry of `topic`.
    pub(super) fn partition(&mut self, topic: &str, partition: u32) -> Result<(), String> {
        if self.partitions.len() >= PARTITIONS_PER_REQUEST_MAX {
            return Err(format!(
                "the request names more than {PARTITIONS_PER_REQUEST_MAX} partitions"
            ));
        }
        if !self.partitions.insert((topic.to_string(), partition)) {
            return Err(format!(
                "the request names partition {partition} of topic '{topic}' twice"
            ));
        }
        Ok(())
    }

    fn topic_count(&self) -> usize {
        self.topics.len()
    }

    fn partition_count(&self) -> usize {
        self.partitions.len()
    }
}

/// Checks the topic → partition entries of a Produce, Fetch or ListOffsets
/// request (counts, duplicates) and that its worst-case response fits: a topic
/// result per topic, a result with an error message per partition.
pub(super) fn partition_entries<'a, P>(
    id: u32,
    what: &str,
    topics: impl IntoIterator<Item = (&'a str, P)>,
) -> Result<(), Outgoing>
where
    P: IntoIterator<Item = u32>,
{
    let mut entries = Entries::default();
    let mut names_bytes = 0;
    for (topic, partitions) in topics {
        entries.topic(topic).map_err(|m| invalid(id, &m))?;
        names_bytes += topic.len();
        for partition in partitions {
            entries
                .partition(topic, partition)
                .map_err(|m| invalid(id, &m))?;
        }
    }
    let mut size = ResponseSize::new();
    size.add(entries.topic_count(), ResponseSize::item_with_message(0))
        .add(1, names_bytes)
        .add(
            entries.partition_count(),
            ResponseSize::item_with_message(0),
        );
    size.check(id, what)
}

/// Checks a list of topic names (Metadata, DescribeTopics, DeleteTopics).
pub(super) fn names<'a>(
    id: u32,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, Outgoing> {
    let mut entries = Entries::default();
    let mut out = Vec::new();
    for name in names {
        entries.topic(name).map_err(|m| invalid(id, &m))?;
        out.push(name.to_string());
    }
    Ok(out)
}

/// An `InvalidRequest` response.
pub(super) fn invalid(id: u32, message: &str) -> Outgoing {
    error_response(id, ErrorCode::InvalidRequest, message)
}
