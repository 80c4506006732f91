//! Handshake: protocol version negotiation; tells the client which shard owns the
//! connection.

use std::rc::Rc;

use flatbuffers::FlatBufferBuilder;
use sluice_schema::wire::{self, ErrorCode};
use sluice_schema::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};

use crate::protocol::{error_response, ok, Outgoing};
use crate::shard::Shard;

/// Answers a handshake (also used by the connection to enforce it comes first).
pub fn handshake_response(
    shard: &Rc<Shard>,
    id: u32,
    request: wire::HandshakeRequest<'_>,
) -> Outgoing {
    let (low, high) = (request.version_min(), request.version_max());
    let version = high.min(PROTOCOL_VERSION_MAX);
    if low > high || version < low.max(PROTOCOL_VERSION_MIN) {
        let message = format!(
            "no common protocol version: client speaks {low}..={high}, broker speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}"
        );
        return error_response(id, ErrorCode::UnsupportedVersion, &message);
    }
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let software = fbb.create_string(concat!("sluice-broker ", env!("CARGO_PKG_VERSION")));
    let body = wire::HandshakeResponse::create(
        &mut fbb,
        &wire::HandshakeResponseArgs {
            version,
            node_id: shard.settings.node_id.0,
            shard: shard.id.0,
            shard_count: shard.mesh.shard_count() as u16,
            frame_bytes_max: crate::limits::FRAME_BYTES_MAX as u32,
            broker_software: Some(software),
        },
    );
    ok(
        fbb,
        id,
        wire::ResponseBody::HandshakeResponse,
        body.as_union_value(),
        Vec::new(),
    )
}

pub(super) fn handle(shard: &Rc<Shard>, id: u32, request: wire::HandshakeRequest<'_>) -> Outgoing {
    handshake_response(shard, id, request)
}
