//! The admin server from outside: the seeds' REST endpoints with their status
//! codes, the bearer token, the rate limit, health checks, Prometheus metrics, and
//! the web UI rendered in a real (headless) browser.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};
use sluice_tests::http::{get, request};
use sluice_tests::{free_port, scratch, Broker};

fn start(name: &str, extra: &[&str]) -> (Broker, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin_arg = admin.to_string();
    let mut args = vec!["--admin-listen", admin_arg.as_str(), "--shards", "2"];
    args.extend_from_slice(extra);
    let broker = Broker::start(name, &args);
    (broker, admin)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Produces `count` records to `topic` and waits for their acks.
fn produce(broker: &Broker, topic: &str, count: usize) {
    runtime().block_on(async {
        let client = Client::connect(ClientConfig::new([broker.addr.to_string()]))
            .await
            .unwrap();
        let producer = Producer::new(client, ProducerConfig::default());
        let mut acks = Vec::new();
        for i in 0..count {
            let record = ProducerRecord::new(topic.to_string(), format!("value-{i}").into_bytes())
                .with_key(format!("key-{i}").into_bytes());
            acks.push(producer.send(record).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
        producer.close().await.unwrap();
    });
}

#[test]
fn the_topic_endpoints_answer_with_the_seeds_bodies_and_status_codes() {
    let (_broker, admin) = start("admin-topics", &[]);
    let created = request(
        admin,
        "POST",
        "/api/kafka/topics",
        &[],
        Some(r#"{"name": "user-events", "numPartitions": 3, "replicationFactor": 1}"#),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["topic"], "user-events");
    let again = request(
        admin,
        "POST",
        "/api/kafka/topics",
        &[],
        Some(r#"{"name": "user-events", "numPartitions": 3}"#),
    );
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.json()["message"].as_str().unwrap().contains("exists"));
    let bad_name = request(
        admin,
        "POST",
        "/api/kafka/topics",
        &[],
        Some(r#"{"name": "no spaces", "numPartitions": 1}"#),
    );
    assert_eq!(bad_name.status, 400);
    assert!(bad_name.json()["error"].is_string());
    let bad_config = request(
        admin,
        "POST",
        "/api/kafka/topics",
        &[],
        Some(r#"{"name": "t2", "numPartitions": 1, "configs": {"retention.ms": "soon"}}"#),
    );
    assert_eq!(bad_config.status, 400, "{}", bad_config.body);
    assert!(bad_config.body.contains("retention.ms"));
    let not_json = request(admin, "POST", "/api/kafka/topics", &[], Some("{name"));
    assert_eq!(not_json.status, 400);

    let list = get(admin, "/api/kafka/topics");
    assert_eq!(list.status, 200);
    let list = list.json();
    assert_eq!(list["topics"], serde_json::json!(["user-events"]));
    assert_eq!(list["count"], 1);

    let metadata = get(admin, "/api/kafka/topics/user-events/metadata");
    assert_eq!(metadata.status, 200);
    let metadata = metadata.json();
    assert_eq!(metadata["topic"], "user-events");
    assert_eq!(metadata["partitionCount"], 3);
    let partitions = metadata["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    for (i, p) in partitions.iter().enumerate() {
        assert_eq!(p["partitionId"], i);
        assert_eq!(p["leader"], 1);
        assert_eq!(p["replicas"], serde_json::json!([1]));
        assert_eq!(p["inSyncReplicas"], serde_json::json!([1]));
    }
    assert_eq!(get(admin, "/api/kafka/topics/nope/metadata").status, 404);

    let deleted = request(admin, "DELETE", "/api/kafka/topics/user-events", &[], None);
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    assert_eq!(
        get(admin, "/api/kafka/topics/user-events/metadata").status,
        404
    );
    assert_eq!(
        request(admin, "DELETE", "/api/kafka/topics/user-events", &[], None).status,
        404
    );
    assert_eq!(get(admin, "/api/nothing-here").status, 404);

    let cluster = get(admin, "/api/cluster").json();
    assert_eq!(cluster["mode"], "single-node");
    assert_eq!(cluster["nodes"].as_array().unwrap().len(), 1);
}

#[test]
fn mutating_endpoints_need_the_token_and_every_client_ip_is_rate_limited() {
    let dir = scratch("admin-token");
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let token_path = token_file.display().to_string();
    let (_broker, admin) = start(
        "admin-token-broker",
        &["--admin-token-file", &token_path, "--admin-rate-limit", "5"],
    );
    let body = r#"{"name": "orders", "numPartitions": 2}"#;
    let refused = request(admin, "POST", "/api/kafka/topics", &[], Some(body));
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    let wrong = request(
        admin,
        "POST",
        "/api/kafka/topics",
        &[("Authorization", "Bearer nope")],
        Some(body),
    );
    assert_eq!(wrong.status, 401);
    let created = request(
        admin,
        "POST",
        "/api/kafka/topics",
        &[("Authorization", "Bearer s3cret-token")],
        Some(body),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let refused_delete = request(admin, "DELETE", "/api/kafka/topics/orders", &[], None);
    assert_eq!(refused_delete.status, 401);
    // Reads stay open.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(get(admin, "/api/kafka/topics").status, 200);

    // 5 per second with bursts of 10: a flood gets 429 with Retry-After.
    let mut limited = None;
    for _ in 0..40 {
        let response = get(admin, "/api/kafka/topics");
        if response.status == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.status, 200);
    }
    let limited = limited.expect("a flood of requests is rate limited");
    let retry: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "retry after {retry}");
    assert!(limited.json()["message"]
        .as_str()
        .unwrap()
        .contains("per second"));
    // Health and metrics are not behind the API's limit.
    assert_eq!(get(admin, "/health/live").status, 200);
    assert_eq!(get(admin, "/metrics").status, 200);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(get(admin, "/api/kafka/topics").status, 200);
}

#[test]
fn health_checks_say_live_and_ready_with_detail() {
    let (mut broker, admin) = start("admin-health", &[]);
    let live = get(admin, "/health/live");
    assert_eq!(
        (live.status, live.json()["status"].clone()),
        (200, "live".into())
    );
    // The harness saw one shard answer a handshake; every shard is ready
    // moments later.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let ready = get(admin, "/health/ready");
        if ready.status == 200 || Instant::now() > deadline {
            break ready;
        }
        assert_eq!(ready.status, 503, "{}", ready.body);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready.status, 200, "{}", ready.body);
    let ready = ready.json();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["shards"].as_array().unwrap().len(), 2);
    assert!(broker.terminate());
    // Once the broker is gone so is its admin server.
    assert!(std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(500)).is_err());
}

/// Every sample line of a Prometheus text exposition: `name{labels} value`.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let metric = name.split('{').next().unwrap();
            assert!(
                metric.starts_with("sluice_")
                    && metric
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "metric name {metric:?}"
            );
            (name.to_string(), value)
        })
        .collect()
}

fn value(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, _)| n == name || n.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_count_what_the_node_did_in_prometheus_format() {
    let (broker, admin) = start("admin-metrics", &[]);
    broker.cli_ok(&["topic", "create", "orders", "--partitions", "3"], None);
    produce(&broker, "orders", 3000);
    broker.cli_ok(
        &[
            "consume",
            "orders",
            "--partition",
            "0",
            "--max-messages",
            "10",
        ],
        None,
    );
    // The WAL figures are published every 500 ms.
    std::thread::sleep(Duration::from_millis(1200));
    let response = get(admin, "/metrics");
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = response.body;
    let all = samples(&text);
    assert_eq!(
        value(&all, "sluice_produced_records_total"),
        3000.0,
        "{text}"
    );
    assert!(value(&all, "sluice_produced_bytes_total") > 3000.0 * 7.0);
    assert!(value(&all, "sluice_wal_fsyncs_total") >= 1.0);
    assert!(value(&all, "sluice_wal_fsync_duration_seconds_count") >= 1.0);
    assert!(value(&all, "sluice_wal_appends_per_fsync_count") >= 1.0);
    // Where produce time went: every stage was seen, and the parts of a request
    // take no longer than the whole.
    let stage = |name: &str, what: &str| {
        value(
            &all,
            &format!("sluice_produce_stage_seconds_{what}{{stage=\"{name}\"}}"),
        )
    };
    for name in sluice_broker::metrics::PRODUCE_STAGES {
        assert!(stage(name, "count") >= 1.0, "stage {name}: {text}");
    }
    let produce_seconds = value(
        &all,
        "sluice_request_duration_seconds_sum{kind=\"produce\"}",
    );
    assert!(stage("wal_sync", "sum") > 0.0);
    assert!(stage("verify", "sum") + stage("append", "sum") <= produce_seconds * 1.01 + 1e-3);
    assert!(value(&all, "sluice_fetched_bytes_total") > 0.0);
    assert!(value(&all, "sluice_connections_accepted_total") >= 1.0);
    let produce_requests: f64 = all
        .iter()
        .filter(|(n, _)| n.starts_with("sluice_requests_total{") && n.contains("kind=\"produce\""))
        .map(|(_, v)| v)
        .sum();
    assert!(produce_requests >= 1.0);
    assert!(text.contains("sluice_request_duration_seconds_bucket{kind=\"produce\",le=\"+Inf\"}"));
    let hw: f64 = (0..3)
        .map(|p| {
            value(
                &all,
                &format!("sluice_partition_high_watermark{{topic=\"orders\",partition=\"{p}\"}}"),
            )
        })
        .sum();
    assert_eq!(hw, 3000.0);
    assert_eq!(value(&all, "sluice_shard_ready"), 2.0);
    // Every metric has HELP and TYPE lines.
    for (name, _) in &all {
        let base = name.split('{').next().unwrap();
        let family = base
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# TYPE {family} "))
                || text.contains(&format!("# TYPE {base} ")),
            "no TYPE for {name}"
        );
    }
}

/// Installs chromium with the project's script when it is missing.
fn chromium() -> PathBuf {
    let find = || {
        ["chromium", "chromium-browser"].iter().find_map(|name| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
    };
    if let Some(path) = find() {
        return path;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/install-test-deps.sh");
    let status = Command::new("bash").arg(&script).status().unwrap();
    assert!(status.success(), "tools/install-test-deps.sh failed");
    find().expect("chromium installed by tools/install-test-deps.sh")
}

/// Loads `url` headless and returns the DOM after `budget_ms` of (virtual) time.
fn render(browser: &Path, url: &str, budget_ms: u32, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = Command::new(browser);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ]);
    command.arg(format!("--user-data-dir={}", profile.path().display()));
    command.arg(format!("--virtual-time-budget={budget_ms}"));
    match screenshot {
        Some(path) => {
            command.arg(format!("--screenshot={}", path.display()));
        }
        None => {
            command.arg("--dump-dom");
        }
    }
    command.arg(url);
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM.
fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\">");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page"))
        + marker.len();
    let end = dom[start..].find('<').unwrap() + start;
    &dom[start..end]
}

fn parse_rate(text: &str) -> f64 {
    let text = text.trim();
    let (number, scale) = match text.chars().last() {
        Some('k') => (&text[..text.len() - 1], 1e3),
        Some('M') => (&text[..text.len() - 1], 1e6),
        _ => (text, 1.0),
    };
    number.parse::<f64>().unwrap_or(0.0) * scale
}

#[test]
fn the_web_ui_shows_topics_partitions_and_a_live_rate_in_a_real_browser() {
    let browser = chromium();
    let (broker, admin) = start("admin-ui", &[]);
    broker.cli_ok(&["topic", "create", "orders", "--partitions", "3"], None);
    broker.cli_ok(&["topic", "create", "payments", "--partitions", "5"], None);
    produce(&broker, "orders", 500);
    let base = format!("http://{admin}/");

    let dom = render(&browser, &base, 3000, None);
    assert!(dom.contains("data-topic=\"orders\""), "{dom}");
    assert!(dom.contains("data-topic=\"payments\""));
    let orders_row = &dom[dom.find("data-topic=\"orders\"").unwrap()..];
    assert!(orders_row.contains("<td class=\"n partitions\">3</td>"));
    let payments_row = &dom[dom.find("data-topic=\"payments\"").unwrap()..];
    assert!(payments_row.contains("<td class=\"n partitions\">5</td>"));
    assert!(dom.contains("single-node"));
    assert!(dom.contains(">ready<"));
    assert_eq!(element_text(&dom, "records-total"), "500");
    assert_eq!(
        parse_rate(element_text(&dom, "rate")),
        0.0,
        "nothing is produced now"
    );

    // A producer runs: the rate the page shows moves.
    let running = Arc::new(AtomicBool::new(true));
    let addr = broker.addr.to_string();
    let producer = {
        let running = running.clone();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
                let producer = Producer::new(client, ProducerConfig::default());
                let mut i = 0u64;
                while running.load(Ordering::Relaxed) {
                    let record =
                        ProducerRecord::new("payments", format!("payment-{i}").into_bytes());
                    producer.send_detached(record).await.unwrap();
                    i += 1;
                    if i.is_multiple_of(200) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                producer.close().await.unwrap();
            });
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    let moving = loop {
        let dom = render(&browser, &base, 4000, None);
        let rate = parse_rate(element_text(&dom, "rate"));
        let total: u64 = element_text(&dom, "records-total").parse().unwrap();
        if rate > 0.0 && total > 500 {
            break Some((rate, total, dom));
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    let (rate, total, _) = moving.expect("the page shows a produce rate while a producer runs");
    eprintln!("the UI showed {rate} records/s, {total} records in total");
    let topic_page = render(&browser, &format!("{base}#/topic/payments"), 4000, None);
    assert!(topic_page.contains("5 partitions"), "{topic_page}");
    let rows = topic_page
        .match_indices("data-partition=\"")
        .filter(|(at, m)| {
            topic_page[at + m.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .count();
    assert_eq!(rows, 5, "one row per partition");

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let overview = shots.join("overview.png");
    let _ = std::fs::remove_file(&overview);
    render(&browser, &base, 3000, Some(&overview));
    render(
        &browser,
        &format!("{base}#/topic/payments"),
        3000,
        Some(&shots.join("topic-payments.png")),
    );
    running.store(false, Ordering::Relaxed);
    producer.join().unwrap();
    let png = std::fs::read(&overview).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

#[test]
fn readiness_answers_503_while_the_shards_recover_then_200() {
    let dir = scratch("admin-ready");
    let data = dir.join("data");
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin_arg = admin.to_string();
    let args = ["--admin-listen", admin_arg.as_str(), "--shards", "2"];
    // Some data, then a crash: the next start recovers it.
    let mut broker = Broker::start_in(&data, port, &args);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "4"], None);
    produce(&broker, "t", 20_000);
    broker.kill9();
    let broker = Broker::start_in_background(&data, port, &args);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(100)).is_ok() {
            let status = get(admin, "/health/ready").status;
            if seen.last() != Some(&status) {
                seen.push(status);
            }
            if status == 200 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(seen, vec![503, 200], "readiness over the start: {seen:?}");
    broker.wait_until_ready();
    assert_eq!(get(admin, "/health/live").status, 200);
}

#[test]
fn metrics_move_when_traffic_flows() {
    let (broker, admin) = start("admin-metrics-move", &[]);
    broker.cli_ok(&["topic", "create", "t", "--partitions", "2"], None);
    produce(&broker, "t", 100);
    std::thread::sleep(Duration::from_millis(700));
    let before = samples(&get(admin, "/metrics").body);
    produce(&broker, "t", 400);
    std::thread::sleep(Duration::from_millis(700));
    let after = samples(&get(admin, "/metrics").body);
    for name in [
        "sluice_produced_records_total",
        "sluice_produced_bytes_total",
        "sluice_wal_appends_total",
        "sluice_wal_fsyncs_total",
        "sluice_wal_fsync_duration_seconds_count",
    ] {
        assert!(
            value(&after, name) > value(&before, name),
            "{name} did not move"
        );
    }
    assert_eq!(
        value(&after, "sluice_produced_records_total")
            - value(&before, "sluice_produced_records_total"),
        400.0
    );
}
