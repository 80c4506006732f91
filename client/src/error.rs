//! One error type for the whole client, and the broker's error codes.
//!
//! Every [`wire::ErrorCode`] maps to a [`Code`]; a broker-reported failure becomes
//! [`Error::Broker`] (or a more specific variant when the response carries extra
//! data, like [`Error::OffsetOutOfRange`]). [`Error::is_retriable`] tells the
//! producer and consumer whether trying again can help.

use std::sync::Arc;
use std::time::Duration;

use sluice_schema::wire;

/// Result alias used throughout the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broker error code (`wire::ErrorCode`), as a Rust enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Code {
    /// Success.
    #[default]
    None,
    /// Unexpected broker-side failure. Retriable.
    Internal,
    /// The envelope failed verification.
    MalformedRequest,
    /// The request kind's version is not supported.
    UnsupportedVersion,
    /// The request kind is unknown to the broker.
    UnknownRequestKind,
    /// The topic does not exist.
    UnknownTopic,
    /// The topic has no such partition.
    UnknownPartition,
    /// The topic already exists.
    TopicAlreadyExists,
    /// The topic name is invalid.
    InvalidTopicName,
    /// A config key or value is invalid.
    InvalidConfig,
    /// The partition count is out of range.
    InvalidPartitionCount,
    /// A batch failed its CRC check (corrupted in transit). Retriable.
    CorruptBatch,
    /// A batch is malformed.
    InvalidBatch,
    /// A batch exceeds the topic's `max.message.bytes`.
    RecordTooLarge,
    /// The requested offset is outside the log.
    OffsetOutOfRange,
    /// The broker timed the request out. Retriable.
    RequestTimedOut,
    /// Storage I/O failed. Retriable.
    StorageError,
    /// The broker's disk is full. Retriable.
    DiskFull,
    /// The broker is shutting down. Retriable.
    ShuttingDown,
    /// The request is semantically invalid.
    InvalidRequest,
    /// The first request on a connection must be a handshake.
    HandshakeRequired,
    /// The partition log is corrupt before its tail.
    CorruptLog,
    /// The broker is at its connection limit. Retriable.
    TooManyConnections,
    /// The topic is being created or deleted. Retriable.
    TopicBusy,
    /// The response would exceed the protocol's limits: ask for less.
    ResponseTooLarge,
    /// The node does not lead the partition: refresh metadata, send to the
    /// leader. Retriable.
    NotLeader,
    /// No leader right now (an election). Retriable.
    LeaderNotAvailable,
    /// The replication factor is outside what the cluster allows.
    InvalidReplicationFactor,
    /// The group does not know the member id (it left or its session expired):
    /// rejoin with epoch 0 and an empty member id.
    UnknownMemberId,
    /// The member epoch is not the member's current one: rejoin.
    StaleMemberEpoch,
    /// The group has active members; the operation needs an empty group.
    GroupNotEmpty,
    /// No such group.
    UnknownGroup,
    /// The group id is not 1..=249 bytes of `[a-zA-Z0-9._-]`.
    InvalidGroupId,
    /// The session (or rebalance) timeout is outside the broker's bounds.
    InvalidSessionTimeout,
    /// An idempotent producer's batch skips sequence numbers (or the broker lost
    /// the producer's state).
    OutOfOrderSequence,
    /// The producer epoch is older than the broker's for this producer id.
    InvalidProducerEpoch,
    /// A committed offset names a partition the member does not own.
    PartitionNotAssigned,
    /// A code this client does not know (a newer broker).
    Unknown(u16),
}

impl Code {
    /// Maps a wire code to [`Code`].
    pub fn from_wire(code: wire::ErrorCode) -> Code {
        const TABLE: [Code; 37] = [
            Code::None,
            Code::Internal,
            Code::MalformedRequest,
            Code::UnsupportedVersion,
            Code::UnknownRequestKind,
            Code::UnknownTopic,
            Code::UnknownPartition,
            Code::TopicAlreadyExists,
            Code::InvalidTopicName,
            Code::InvalidConfig,
            Code::InvalidPartitionCount,
            Code::CorruptBatch,
            Code::InvalidBatch,
            Code::RecordTooLarge,
            Code::OffsetOutOfRange,
            Code::RequestTimedOut,
            Code::StorageError,
            Code::DiskFull,
            Code::ShuttingDown,
            Code::InvalidRequest,
            Code::HandshakeRequired,
            Code::CorruptLog,
            Code::TooManyConnections,
            Code::TopicBusy,
            Code::ResponseTooLarge,
            Code::NotLeader,
            Code::LeaderNotAvailable,
            Code::InvalidReplicationFactor,
            Code::UnknownMemberId,
            Code::StaleMemberEpoch,
            Code::GroupNotEmpty,
            Code::UnknownGroup,
            Code::InvalidGroupId,
            Code::InvalidSessionTimeout,
            Code::OutOfOrderSequence,
            Code::InvalidProducerEpoch,
            Code::PartitionNotAssigned,
        ];
        TABLE
            .get(usize::from(code.0))
            .copied()
            .unwrap_or(Code::Unknown(code.0))
    }

    /// The wire value of this code.
    pub fn to_wire(self) -> wire::ErrorCode {
        let all = wire::ErrorCode::ENUM_VALUES;
        match self {
            Code::Unknown(value) => wire::ErrorCode(value),
            known => all
                .iter()
                .copied()
                .find(|candidate| Code::from_wire(*candidate) == known)
                .unwrap_or(wire::ErrorCode::Internal),
        }
    }

    /// Whether a request that failed with this code may succeed if sent again.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            Code::Internal
                | Code::CorruptBatch
                | Code::RequestTimedOut
                | Code::StorageError
                | Code::DiskFull
                | Code::ShuttingDown
                | Code::TooManyConnections
                | Code::TopicBusy
                | Code::NotLeader
                | Code::LeaderNotAvailable
        )
    }

    /// Whether the error says the client's idea of the partition's leader is
    /// stale (refresh metadata before retrying).
    pub fn means_stale_route(self) -> bool {
        matches!(self, Code::NotLeader | Code::LeaderNotAvailable)
    }

    /// Whether the error says a group member has been fenced (its session
    /// expired, or it was replaced): it must drop its partitions without
    /// committing and rejoin.
    pub fn means_fenced(self) -> bool {
        matches!(self, Code::UnknownMemberId | Code::StaleMemberEpoch)
    }

    /// `true` for [`Code::None`].
    pub fn is_ok(self) -> bool {
        self == Code::None
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Code::Unknown(value) => write!(f, "unknown error code {value}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// Everything that can go wrong in the client.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker answered with an error code.
    #[error("broker error {code}{}", message_suffix(.message))]
    Broker {
        /// The code.
        code: Code,
        /// The broker's explanation, if any.
        message: Option<String>,
    },
    /// A fetch or list-offsets position is outside the partition's log.
    #[error(
        "offset {offset} is out of range for {topic}/{partition}: valid offsets are \
         [{log_start_offset}, {high_watermark})"
    )]
    OffsetOutOfRange {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// First offset still in the log.
        log_start_offset: u64,
        /// Offset the next appended record will get.
        high_watermark: u64,
    },
    /// The topic does not exist.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// The topic exists but has no such partition.
    #[error("topic {topic:?} has no partition {partition}")]
    UnknownPartition {
        /// Topic.
        topic: String,
        /// Partition asked for.
        partition: u32,
    },
    /// A socket operation failed.
    #[error("i/o error talking to {addr}: {source}")]
    Io {
        /// Broker address.
        addr: String,
        /// The underlying error.
        source: Arc<std::io::Error>,
    },
    /// Could not connect to any broker.
    #[error("could not connect to {addr}: {reason}")]
    Connect {
        /// Address(es) tried.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection closed while requests were outstanding.
    #[error("connection to {addr} closed: {reason}")]
    ConnectionClosed {
        /// Broker address.
        addr: String,
        /// Why it closed.
        reason: String,
    },
    /// No response arrived within the request timeout.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// A frame's length is over the limit.
    #[error("frame of {bytes} bytes exceeds the limit of {bytes_max} bytes")]
    FrameTooLarge {
        /// Frame length (prefix included).
        bytes: usize,
        /// Limit.
        bytes_max: usize,
    },
    /// The byte stream is not valid framing.
    #[error("malformed frame: {0}")]
    MalformedFrame(String),
    /// A response envelope failed verification or misses a required part.
    #[error("malformed response: {0}")]
    MalformedResponse(String),
    /// A fetched batch failed its CRC check.
    #[error("corrupt batch: {0}")]
    CorruptBatch(String),
    /// A fetched batch or record is malformed.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A record (or batch) is too large to send.
    #[error("record of {bytes} bytes is too large (limit {bytes_max})")]
    RecordTooLarge {
        /// Encoded size.
        bytes: usize,
        /// Limit.
        bytes_max: usize,
    },
    /// The broker and this client share no protocol version.
    #[error("broker speaks protocol versions this client does not: {0}")]
    UnsupportedVersion(String),
    /// The producer was closed.
    #[error("producer is closed")]
    ProducerClosed,
    /// A record could not be delivered within the delivery timeout.
    #[error("delivery timed out after {elapsed:?}; last error: {last}")]
    DeliveryTimeout {
        /// Time since the record was sent.
        elapsed: Duration,
        /// The last retriable error seen.
        last: Box<Error>,
    },
    /// A configuration value or argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The partition is not assigned to this consumer.
    #[error("{topic}/{partition} is not assigned to this consumer")]
    NotAssigned {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// The group does not know this member (it left, or its session expired):
    /// the member is fenced and must rejoin.
    #[error("unknown member id{}", message_suffix(.message))]
    UnknownMemberId {
        /// The broker's explanation.
        message: Option<String>,
    },
    /// The member epoch is not the member's current one: the member is fenced
    /// and must rejoin.
    #[error("stale member epoch{}", message_suffix(.message))]
    StaleMemberEpoch {
        /// The broker's explanation.
        message: Option<String>,
    },
    /// The group has active members; the operation needs an empty group.
    #[error("the group is not empty{}", message_suffix(.message))]
    GroupNotEmpty {
        /// The broker's explanation.
        message: Option<String>,
    },
    /// No such group.
    #[error("unknown group{}", message_suffix(.message))]
    UnknownGroup {
        /// The broker's explanation.
        message: Option<String>,
    },
    /// The group id is invalid (1..=249 bytes of `[a-zA-Z0-9._-]`).
    #[error("invalid group id{}", message_suffix(.message))]
    InvalidGroupId {
        /// Why.
        message: Option<String>,
    },
    /// The session or rebalance timeout is outside the broker's bounds.
    #[error("invalid session timeout{}", message_suffix(.message))]
    InvalidSessionTimeout {
        /// The broker's explanation (it names the bounds).
        message: Option<String>,
    },
    /// An idempotent producer's batch skips sequence numbers, or the broker lost
    /// the producer's state; the batch was not appended.
    #[error("out of order sequence{}", message_suffix(.message))]
    OutOfOrderSequence {
        /// The broker's explanation.
        message: Option<String>,
    },
    /// The producer epoch is older than the broker's for this producer id.
    #[error("invalid producer epoch{}", message_suffix(.message))]
    InvalidProducerEpoch {
        /// The broker's explanation.
        message: Option<String>,
    },
    /// An offset commit names a partition the member does not own.
    #[error("partition not assigned to this member{}", message_suffix(.message))]
    PartitionNotAssigned {
        /// The broker's explanation.
        message: Option<String>,
    },
    /// A group consumer's membership task is gone (it was closed, or failed).
    #[error("group membership ended: {0}")]
    MembershipEnded(String),
}

fn message_suffix(message: &Option<String>) -> String {
    match message {
        Some(text) if !text.is_empty() => format!(": {text}"),
        _ => String::new(),
    }
}

impl Error {
    /// Whether the operation may succeed if tried again (possibly after a backoff
    /// or a reconnect).
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Broker { code, .. } => code.is_retriable(),
            Error::Io { .. } | Error::ConnectionClosed { .. } | Error::Timeout(_) => true,
            Error::Connect { .. } => true,
            _ => false,
        }
    }

    /// Whether retrying should first refresh where partitions lead: the broker said
    /// "not the leader", or the connection to it failed.
    pub fn means_stale_route(&self) -> bool {
        match self {
            Error::Broker { code, .. } => code.means_stale_route(),
            Error::Io { .. } | Error::ConnectionClosed { .. } | Error::Connect { .. } => true,
            _ => false,
        }
    }

    /// The broker error code, if this error came from the broker.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            Error::OffsetOutOfRange { .. } => Some(Code::OffsetOutOfRange),
            Error::UnknownTopic(_) => Some(Code::UnknownTopic),
            Error::UnknownPartition { .. } => Some(Code::UnknownPartition),
            Error::UnknownMemberId { .. } => Some(Code::UnknownMemberId),
            Error::StaleMemberEpoch { .. } => Some(Code::StaleMemberEpoch),
            Error::GroupNotEmpty { .. } => Some(Code::GroupNotEmpty),
            Error::UnknownGroup { .. } => Some(Code::UnknownGroup),
            Error::InvalidGroupId { .. } => Some(Code::InvalidGroupId),
            Error::InvalidSessionTimeout { .. } => Some(Code::InvalidSessionTimeout),
            Error::OutOfOrderSequence { .. } => Some(Code::OutOfOrderSequence),
            Error::InvalidProducerEpoch { .. } => Some(Code::InvalidProducerEpoch),
            Error::PartitionNotAssigned { .. } => Some(Code::PartitionNotAssigned),
            _ => None,
        }
    }

    /// Whether a group member got this error because it is fenced
    /// ([`Error::UnknownMemberId`] or [`Error::StaleMemberEpoch`]): it must drop
    /// its partitions without committing and rejoin.
    pub fn is_fenced(&self) -> bool {
        self.code().is_some_and(Code::means_fenced)
    }

    /// Builds the error for a non-zero broker code: the typed variant for the
    /// group and idempotence codes, [`Error::Broker`] for the others.
    pub fn from_code(code: Code, message: Option<&str>) -> Error {
        let message = message.map(str::to_owned);
        match code {
            Code::UnknownMemberId => Error::UnknownMemberId { message },
            Code::StaleMemberEpoch => Error::StaleMemberEpoch { message },
            Code::GroupNotEmpty => Error::GroupNotEmpty { message },
            Code::UnknownGroup => Error::UnknownGroup { message },
            Code::InvalidGroupId => Error::InvalidGroupId { message },
            Code::InvalidSessionTimeout => Error::InvalidSessionTimeout { message },
            Code::OutOfOrderSequence => Error::OutOfOrderSequence { message },
            Code::InvalidProducerEpoch => Error::InvalidProducerEpoch { message },
            Code::PartitionNotAssigned => Error::PartitionNotAssigned { message },
            code => Error::Broker { code, message },
        }
    }

    pub(crate) fn io(addr: &str, source: std::io::Error) -> Error {
        Error::Io {
            addr: addr.to_owned(),
            source: Arc::new(source),
        }
    }
}

/// Turns a broker code (+ message) into `Ok(())` or the matching error.
pub fn check_code(code: Code, message: Option<&str>) -> Result<()> {
    if code.is_ok() {
        Ok(())
    } else {
        Err(Error::from_code(code, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_code_maps_and_roundtrips() {
        for wire_code in wire::ErrorCode::ENUM_VALUES {
            let code = Code::from_wire(*wire_code);
            assert!(!matches!(code, Code::Unknown(_)), "{wire_code:?} unmapped");
            assert_eq!(code.to_wire(), *wire_code);
            assert_eq!(format!("{code:?}"), wire_code.variant_name().unwrap_or(""));
        }
        assert_eq!(Code::from_wire(wire::ErrorCode(999)), Code::Unknown(999));
    }

    #[test]
    fn retriable_codes() {
        assert!(Code::StorageError.is_retriable());
        assert!(!Code::UnknownTopic.is_retriable());
        assert!(Error::Timeout(Duration::from_secs(1)).is_retriable());
        assert!(!Error::ProducerClosed.is_retriable());
    }

    #[test]
    fn group_codes_become_typed_errors() {
        let fenced = Error::from_code(Code::UnknownMemberId, Some("gone"));
        assert!(matches!(&fenced, Error::UnknownMemberId { message: Some(m) } if m == "gone"));
        assert!(fenced.is_fenced());
        assert!(!fenced.is_retriable());
        assert!(Error::from_code(Code::StaleMemberEpoch, None).is_fenced());
        assert!(!Error::from_code(Code::GroupNotEmpty, None).is_fenced());
        for code in [
            Code::UnknownMemberId,
            Code::StaleMemberEpoch,
            Code::GroupNotEmpty,
            Code::UnknownGroup,
            Code::InvalidGroupId,
            Code::InvalidSessionTimeout,
            Code::OutOfOrderSequence,
            Code::InvalidProducerEpoch,
            Code::PartitionNotAssigned,
        ] {
            let error = Error::from_code(code, Some("why"));
            assert_eq!(error.code(), Some(code));
            assert!(!matches!(error, Error::Broker { .. }), "{code:?}");
            assert!(error.to_string().ends_with(": why"), "{error}");
        }
        assert!(matches!(
            Error::from_code(Code::TopicBusy, None),
            Error::Broker {
                code: Code::TopicBusy,
                ..
            }
        ));
    }
}
