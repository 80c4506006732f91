//! Routes and handlers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State as Extract};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_client::{Code, Error};

use crate::State;

const INDEX_HTML: &str = include_str!("ui/index.html");

type Shared = Arc<State>;

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/api/kafka/topics", get(list_topics).post(create_topic))
        .route(
            "/api/kafka/topics/{topic}",
            get(topic_metadata).delete(delete_topic),
        )
        .route("/api/kafka/topics/{topic}/metadata", get(topic_metadata))
        .route("/api/groups", get(list_groups))
        .route("/api/groups/{group}", get(describe_group))
        .route("/api/cluster", get(cluster))
        .route("/api/stats", get(stats))
        .layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .merge(api)
        .route("/", get(index))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn error_body(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        json!({ "error": status.canonical_reason().unwrap_or("error"), "message": message }),
    )
}

/// Rate limit per client IP on every `/api/` route, and the bearer token on the
/// mutating ones.
async fn guard(
    Extract(state): Extract<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(wait) = state.limiter.take(peer.ip()) {
        let mut response = error_body(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "more than {} requests per second from {}; retry after {wait} s",
                state.config.rate_per_second,
                peer.ip()
            ),
        );
        if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let mutating = matches!(
        *request.method(),
        Method::POST | Method::DELETE | Method::PUT | Method::PATCH
    );
    if let (true, Some(token)) = (mutating, &state.config.token) {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            let mut response = error_body(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs an Authorization: Bearer token (--admin-token-file)",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Maps a client error to a status and JSON body.
async fn failure(state: &State, error: &Error) -> Response {
    if matches!(
        error,
        Error::Connect { .. } | Error::Io { .. } | Error::ConnectionClosed { .. }
    ) {
        state.reset_client().await;
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the node's client port does not answer: {error}"),
        );
    }
    let status = match error.code() {
        Some(Code::UnknownTopic | Code::UnknownPartition | Code::UnknownGroup) => {
            StatusCode::NOT_FOUND
        }
        Some(Code::TopicAlreadyExists) => StatusCode::CONFLICT,
        Some(Code::GroupNotEmpty | Code::TopicBusy) => StatusCode::CONFLICT,
        Some(
            Code::InvalidTopicName
            | Code::InvalidConfig
            | Code::InvalidPartitionCount
            | Code::InvalidReplicationFactor
            | Code::InvalidRequest
            | Code::InvalidGroupId,
        ) => StatusCode::BAD_REQUEST,
        Some(Code::NotLeader | Code::LeaderNotAvailable | Code::ShuttingDown) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    error_body(status, &error.to_string())
}

macro_rules! client_or_fail {
    ($state:expr) => {
        match $state.client().await {
            Ok(client) => client,
            Err(error) => return failure(&$state, &error).await,
        }
    };
}

#[derive(Deserialize)]
struct ListQuery {
    internal: Option<bool>,
}

async fn list_topics(
    Extract(state): Extract<Shared>,
    query: axum::extract::Query<ListQuery>,
) -> Response {
    let client = client_or_fail!(state);
    match client.list_topics().await {
        Ok(mut topics) => {
            let internal = query.internal.unwrap_or(false);
            topics.retain(|t| internal || !t.name.starts_with("__"));
            topics.sort_by(|a, b| a.name.cmp(&b.name));
            let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
            let details: Vec<Value> = topics
                .iter()
                .map(|t| json!({ "name": t.name, "partitions": t.partitions }))
                .collect();
            json_response(
                StatusCode::OK,
                json!({ "topics": names, "count": names.len(), "details": details }),
            )
        }
        Err(error) => failure(&state, &error).await,
    }
}

async fn topic_metadata(Extract(state): Extract<Shared>, Path(topic): Path<String>) -> Response {
    let client = client_or_fail!(state);
    let description = match client.describe_topic(&topic).await {
        Ok(description) => description,
        Err(error) => return failure(&state, &error).await,
    };
    let partitions: Vec<Value> = description
        .partitions
        .iter()
        .map(|p| {
            let replicas = if p.replicas.is_empty() {
                vec![p.leader_node]
            } else {
                p.replicas.clone()
            };
            let in_sync = usize::from(p.in_sync).max(usize::from(replicas.len() == 1));
            // The leader reports how many replicas are in sync, not which: list
            // them only when that is unambiguous.
            let in_sync_list = if in_sync >= replicas.len() {
                json!(replicas)
            } else if in_sync == 1 {
                json!([p.leader_node])
            } else {
                Value::Null
            };
            json!({
                "partitionId": p.partition,
                "leader": p.leader_node,
                "replicas": replicas,
                "inSyncReplicas": in_sync_list,
                "inSyncReplicaCount": in_sync,
                "shard": p.shard,
                "logStartOffset": p.log_start_offset,
                "highWatermark": p.high_watermark,
                "sizeBytes": p.size_bytes,
                "leaderEpoch": p.leader_epoch,
                "error": if p.error == Code::None { Value::Null } else { json!(p.error.to_string()) },
            })
        })
        .collect();
    let configs: BTreeMap<&str, &str> = description
        .configs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "topic": description.name,
            "partitionCount": description.partitions.len(),
            "partitions": partitions,
            "configs": configs,
        }),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewTopicBody {
    name: String,
    num_partitions: Option<u32>,
    replication_factor: Option<u16>,
    configs: Option<BTreeMap<String, Value>>,
}

async fn create_topic(Extract(state): Extract<Shared>, body: axum::body::Bytes) -> Response {
    let new: NewTopicBody = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(error) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                &format!("the body must be JSON like {{\"name\": \"orders\", \"numPartitions\": 3, \"replicationFactor\": 1, \"configs\": {{\"retention.ms\": \"604800000\"}}}}: {error}"),
            )
        }
    };
    let mut configs = Vec::new();
    for (key, value) in new.configs.unwrap_or_default() {
        let value = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            other => {
                return error_body(
                    StatusCode::BAD_REQUEST,
                    &format!("config {key}: {other} is not a string or a number"),
                )
            }
        };
        configs.push((key, value));
    }
    let partitions = new.num_partitions.unwrap_or(1);
    let replication = new.replication_factor.unwrap_or(0);
    let client = client_or_fail!(state);
    match client
        .create_topic_replicated(&new.name, partitions, replication, configs)
        .await
    {
        Ok(()) => json_response(
            StatusCode::CREATED,
            json!({ "topic": new.name, "numPartitions": partitions, "replicationFactor": replication }),
        ),
        Err(error) => failure(&state, &error).await,
    }
}

async fn delete_topic(Extract(state): Extract<Shared>, Path(topic): Path<String>) -> Response {
    let client = client_or_fail!(state);
    match client.delete_topic(&topic).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => failure(&state, &error).await,
    }
}

async fn list_groups(Extract(state): Extract<Shared>) -> Response {
    let client = client_or_fail!(state);
    match client.list_groups().await {
        Ok(groups) => {
            let groups: Vec<Value> = groups
                .iter()
                .map(|g| {
                    json!({
                        "groupId": g.group_id,
                        "state": g.state,
                        "members": g.members,
                        "groupEpoch": g.group_epoch,
                    })
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({ "count": groups.len(), "groups": groups }),
            )
        }
        Err(error) => failure(&state, &error).await,
    }
}

async fn describe_group(Extract(state): Extract<Shared>, Path(group): Path<String>) -> Response {
    let client = client_or_fail!(state);
    let description = match client.describe_group(&group).await {
        Ok(description) => description,
        Err(error) => return failure(&state, &error).await,
    };
    let mut partitions = Vec::new();
    let mut total_lag = 0u64;
    for (topic, offsets) in &description.offsets {
        let high_watermarks: BTreeMap<u32, u64> = match client.describe_topic(topic).await {
            Ok(t) => t
                .partitions
                .iter()
                .map(|p| (p.partition, p.high_watermark))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        for offset in offsets {
            let hw = high_watermarks.get(&offset.partition).copied();
            let lag = match (hw, offset.offset) {
                (Some(hw), Some(at)) => Some(hw.saturating_sub(at)),
                _ => None,
            };
            total_lag += lag.unwrap_or(0);
            partitions.push(json!({
                "topic": topic,
                "partition": offset.partition,
                "committedOffset": offset.offset,
                "highWatermark": hw,
                "lag": lag,
            }));
        }
    }
    let members: Vec<Value> = description
        .members
        .iter()
        .map(|m| {
            let assignment: Vec<Value> = m
                .assignment
                .iter()
                .map(|tp| json!({ "topic": tp.topic, "partitions": tp.partitions }))
                .collect();
            json!({
                "memberId": m.member_id,
                "instanceId": m.instance_id,
                "clientId": m.client_id,
                "memberEpoch": m.member_epoch,
                "subscribedTopics": m.subscribed_topics,
                "assignment": assignment,
                "sessionTimeoutMs": m.session_timeout_ms,
                "lastHeartbeatMsAgo": m.last_heartbeat_ms_ago,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "groupId": description.group_id,
            "state": description.state,
            "groupEpoch": description.group_epoch,
            "assignor": description.assignor,
            "members": members,
            "partitions": partitions,
            "totalLag": total_lag,
        }),
    )
}

async fn cluster(Extract(state): Extract<Shared>) -> Response {
    let client = client_or_fail!(state);
    match client.metadata(&["__sluice_no_such_topic__"]).await {
        Ok(metadata) => {
            let nodes: Vec<Value> = metadata
                .brokers
                .iter()
                .map(|b| {
                    json!({
                        "nodeId": b.node_id,
                        "host": b.host,
                        "port": b.port,
                        "shards": b.shard_count,
                        "reachable": b.reachable,
                    })
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({
                    "mode": if state.config.cluster { "cluster" } else { "single-node" },
                    "nodeId": metadata.node_id,
                    "controller": if metadata.controller_node == 0 { Value::Null } else { json!(metadata.controller_node) },
                    "nodes": nodes,
                }),
            )
        }
        Err(error) => failure(&state, &error).await,
    }
}

async fn stats(Extract(state): Extract<Shared>) -> Response {
    let totals: BTreeMap<&str, f64> = (state.config.totals)().into_iter().collect();
    json_response(
        StatusCode::OK,
        json!({
            "uptimeSeconds": state.started.elapsed().as_secs_f64(),
            "totals": totals,
        }),
    )
}

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

async fn live() -> Response {
    json_response(StatusCode::OK, json!({ "status": "live" }))
}

async fn ready(Extract(state): Extract<Shared>) -> Response {
    let shards = (state.config.shards_ready)();
    let shards_ready = !shards.is_empty() && shards.iter().all(|r| *r);
    let mut detail = json!({
        "shards": shards.iter().enumerate().map(|(i, r)| json!({ "shard": i, "ready": r })).collect::<Vec<_>>(),
    });
    let mut ready = shards_ready;
    if state.config.cluster && shards_ready {
        // Joined: the node answers metadata and knows the controller's leader.
        let joined = match state.client().await {
            Ok(client) => match client.metadata(&["__sluice_no_such_topic__"]).await {
                Ok(metadata) => metadata.controller_node != 0,
                Err(_) => false,
            },
            Err(_) => false,
        };
        detail["clusterJoined"] = json!(joined);
        ready &= joined;
    }
    detail["status"] = json!(if ready { "ready" } else { "not ready" });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, detail)
}

async fn metrics(Extract(state): Extract<Shared>) -> Response {
    let mut out = String::with_capacity(64 * 1024);
    (state.config.render_metrics)(&mut out);
    match state.client().await {
        Ok(client) => crate::prometheus::gather(&client, state.config.cluster, &mut out).await,
        Err(_) => {
            state.reset_client().await;
            out.push_str("# HELP sluice_admin_scrape_errors Requests to the node that failed while gathering this scrape.\n# TYPE sluice_admin_scrape_errors gauge\nsluice_admin_scrape_errors 1\n");
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn not_found() -> Response {
    error_body(StatusCode::NOT_FOUND, "no such endpoint")
}
