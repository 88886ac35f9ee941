//! Which instance holds which shard, so that any instance answers any lookup by forwarding it to the owner
//! of the next shard on the path (as Kafka Streams routes interactive queries with `application.server`).
//!
//! Kafka itself is the registry: every sharded instance joins the consumer group with a `client.id` that
//! carries its advertised HTTP address ([`client_id`]), and the group's description (DescribeGroups) lists
//! every member with its client id and its current assignment, whose partitions of the shard topic are the
//! shards it holds. No topic or service of our own; the answer is as current as the group's generation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::net::TcpStream;

use super::ShardId;
use crate::config::Config;
use crate::kafka::LoggingContext;

/// What a sharded instance's `client.id` starts with; its advertised HTTP address follows.
const CLIENT_ID_PREFIX: &str = "stitcher@";

/// The `client.id` of an instance whose HTTP API is reachable at `advertised` (`host:port`).
pub fn client_id(advertised: &str) -> String {
    format!("{CLIENT_ID_PREFIX}{advertised}")
}

/// The advertised address in a member's client id.
fn advertised_of(client_id: &str) -> Option<&str> {
    client_id
        .strip_prefix(CLIENT_ID_PREFIX)
        .filter(|a| !a.is_empty())
}

/// The partitions of `topic` in a member's assignment, as the consumer protocol encodes it: version (int16),
/// then per topic its name (int16 length + bytes) and partitions (int32 count + int32 each), then user data.
pub fn assigned_partitions(assignment: &[u8], topic: &str) -> Vec<i32> {
    fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
        let (head, rest) = b.split_first_chunk::<N>()?;
        *b = rest;
        Some(*head)
    }
    fn parse(mut b: &[u8], topic: &str) -> Option<Vec<i32>> {
        let b = &mut b;
        take::<2>(b)?;
        let topics = i32::from_be_bytes(take::<4>(b)?);
        let mut out = Vec::new();
        for _ in 0..topics.max(0) {
            let len = usize::try_from(i16::from_be_bytes(take::<2>(b)?)).ok()?;
            let name = b.get(..len)?;
            *b = &b[len..];
            let count = i32::from_be_bytes(take::<4>(b)?);
            for _ in 0..count.max(0) {
                let p = i32::from_be_bytes(take::<4>(b)?);
                if name == topic.as_bytes() {
                    out.push(p);
                }
            }
        }
        Some(out)
    }
    parse(assignment, topic).unwrap_or_default()
}

/// The owners of the shards, from the group's description, refreshed at most every [`FRESH`] and at once
/// when asked about a shard it does not know.
#[derive(Clone)]
pub struct Owners {
    inner: Arc<OwnersInner>,
}

struct OwnersInner {
    /// Made at the first description, so that a start-up without reachable brokers or credentials yet
    /// (a secret mounted late) still serves the probes; tried again at the next one if it failed.
    client: Mutex<Option<BaseConsumer<LoggingContext>>>,
    cfg: Config,
    group: String,
    topic: String,
    /// This instance's advertised address: a shard it holds itself is not forwarded.
    me: String,
    map: Mutex<(BTreeMap<ShardId, String>, Option<Instant>)>,
}

const FRESH: Duration = Duration::from_secs(5);
/// The least time between two descriptions of the group, even for an unknown shard.
const MIN_REFRESH: Duration = Duration::from_millis(500);

impl Owners {
    pub fn new(cfg: &Config) -> Self {
        Self {
            inner: Arc::new(OwnersInner {
                client: Mutex::new(None),
                cfg: cfg.clone(),
                group: cfg.kafka.group_id.clone(),
                topic: cfg.shard_topic(),
                me: cfg.http.advertised(),
                map: Mutex::new((BTreeMap::new(), None)),
            }),
        }
    }

    /// The advertised address of the instance holding `shard`, other than this one; `None` while no other
    /// member holds it (a rebalance under way). Blocking: call off the async threads.
    pub fn owner(&self, shard: ShardId) -> Option<String> {
        let i = &self.inner;
        let (known, at) = {
            let m = i.map.lock().unwrap_or_else(PoisonError::into_inner);
            (m.0.get(&shard).cloned(), m.1)
        };
        let age = at.map(|t| t.elapsed());
        let stale = age.is_none_or(|a| a > FRESH);
        let may_refresh = age.is_none_or(|a| a > MIN_REFRESH);
        if (stale || known.is_none()) && may_refresh {
            if let Some(map) = self.describe() {
                let mut m = i.map.lock().unwrap_or_else(PoisonError::into_inner);
                *m = (map, Some(Instant::now()));
                return m.0.get(&shard).cloned().filter(|a| *a != i.me);
            }
        }
        known.filter(|a| *a != i.me)
    }

    /// The other instances holding shards, if every one of the `count` shards has a holder (otherwise a
    /// rebalance is under way: `None`). Blocking: call off the async threads.
    pub fn others(&self, count: ShardId) -> Option<BTreeSet<String>> {
        let i = &self.inner;
        let fresh = {
            let m = i.map.lock().unwrap_or_else(PoisonError::into_inner);
            m.1.is_some_and(|t| t.elapsed() <= FRESH)
        };
        if !fresh {
            let map = self.describe()?;
            let mut m = i.map.lock().unwrap_or_else(PoisonError::into_inner);
            *m = (map, Some(Instant::now()));
        }
        let m = i.map.lock().unwrap_or_else(PoisonError::into_inner);
        if (0..count).any(|s| !m.0.contains_key(&s)) {
            return None;
        }
        Some(m.0.values().filter(|a| **a != i.me).cloned().collect())
    }

    /// Shard → advertised address of its holder, from the group's description.
    fn describe(&self) -> Option<BTreeMap<ShardId, String>> {
        let i = &self.inner;
        let mut client = i.client.lock().unwrap_or_else(PoisonError::into_inner);
        if client.is_none() {
            match crate::kafka::base_config(&i.cfg)
                .set("group.id", format!("{}-routing", i.group))
                .create_with_context(LoggingContext)
            {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the client that finds shard owners");
                    return None;
                }
            }
        }
        let list = client
            .as_ref()?
            .fetch_group_list(Some(&i.group), Duration::from_secs(5))
            .ok()?;
        drop(client);
        let group = list.groups().iter().find(|g| g.name() == i.group)?;
        let mut map = BTreeMap::new();
        for m in group.members() {
            let (Some(addr), Some(assignment)) = (advertised_of(m.client_id()), m.assignment())
            else {
                continue;
            };
            for p in assigned_partitions(assignment, &i.topic) {
                if let Ok(shard) = ShardId::try_from(p) {
                    map.insert(shard, addr.to_string());
                }
            }
        }
        Some(map)
    }
}

/// Idle connections to other instances, by address: a forwarded lookup reuses one (HTTP/1.1 keep-alive)
/// rather than paying a TCP handshake per hop.
static IDLE: std::sync::OnceLock<Mutex<HashMap<String, Vec<TcpStream>>>> =
    std::sync::OnceLock::new();
/// Most idle connections kept per other instance.
const IDLE_PER_PEER: usize = 8;
/// Largest response head read from another instance.
const MAX_HEAD: usize = 16 * 1024;

fn idle() -> &'static Mutex<HashMap<String, Vec<TcpStream>>> {
    IDLE.get_or_init(Default::default)
}

/// Why another instance cannot reach an instance that advertises `addr`, if it cannot: an unspecified
/// address (`0.0.0.0`, `[::]`: `http.listen` on every interface with no `http.advertised_address`) reaches
/// whoever dials it, so a lookup forwarded there goes back to the instance that forwarded it.
pub fn unroutable(addr: &str) -> Option<String> {
    let ip = addr.parse::<std::net::SocketAddr>().ok()?.ip();
    ip.is_unspecified().then(|| {
        format!(
            "the instance advertises {addr}, which no other instance can reach: set its \
             http.advertised_address (STITCHER_HTTP_ADVERTISED_ADDRESS) to the host:port the others \
             reach it at"
        )
    })
}

/// GET `path` from `addr` over HTTP/1.1 with an optional bearer token: (status, body). For forwarding
/// lookups between instances on the internal network; bounded by `timeout`. An idle connection to `addr`
/// is reused if there is one (one the peer closed meanwhile fails at once and a new one is made), and the
/// connection is kept for the next lookup unless the peer closes it.
pub async fn http_get(
    addr: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    if let Some(why) = unroutable(addr) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            why,
        ));
    }
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
        token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    );
    let attempt = async {
        let pooled = idle()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(addr)
            .and_then(Vec::pop);
        if let Some(stream) = pooled {
            if let Ok(answer) = exchange(stream, addr, &request).await {
                return Ok(answer);
            }
        }
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        exchange(stream, addr, &request).await
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "forwarded lookup timed out")
    })?
}

/// Reads from `stream` until `buf` holds at least `want` bytes.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    while buf.len() < want {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other(
                "malformed HTTP response: closed before it ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// One request and its response on `stream`, which goes back to the idle connections if the response
/// says how long it is and the peer keeps the connection open.
async fn exchange(
    mut stream: TcpStream,
    addr: &str,
    request: &str,
) -> std::io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let malformed = |what: &str| std::io::Error::other(format!("malformed HTTP response: {what}"));
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::with_capacity(4096);
    let split = loop {
        if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if response.len() > MAX_HEAD {
            return Err(malformed("head too long"));
        }
        let want = response.len() + 1;
        fill(&mut stream, &mut response, want).await?;
    };
    let head = String::from_utf8(response[..split].to_vec()).map_err(|_| malformed("head"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("status line"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut body = response.split_off(split + 4);
    let length: Option<usize> = header("content-length").and_then(|v| v.parse().ok());
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    // Only a body whose end is known without the peer closing leaves the connection reusable; a chunked
    // one is read to its last chunk, and the connection then closed (its trailers are not read).
    let keep =
        length.is_some() && !header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    if let Some(len) = length {
        fill(&mut stream, &mut body, len).await?;
        body.truncate(len);
    } else if chunked {
        let (mut raw, mut decoded, mut at) = (body, Vec::new(), 0);
        loop {
            let line_end = loop {
                if let Some(p) = raw[at..].windows(2).position(|w| w == b"\r\n") {
                    break at + p;
                }
                if raw.len() - at > MAX_HEAD {
                    return Err(malformed("chunk size line too long"));
                }
                let want = raw.len() + 1;
                fill(&mut stream, &mut raw, want).await?;
            };
            let size = std::str::from_utf8(&raw[at..line_end])
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| malformed("chunk size"))?;
            if size == 0 {
                break;
            }
            let data = line_end + 2;
            fill(&mut stream, &mut raw, data + size + 2).await?;
            decoded.extend_from_slice(&raw[data..data + size]);
            at = data + size + 2;
        }
        body = decoded;
    } else {
        stream.read_to_end(&mut body).await?;
    }
    if keep {
        let mut idle = idle().lock().unwrap_or_else(PoisonError::into_inner);
        let peer = idle.entry(addr.to_string()).or_default();
        if peer.len() < IDLE_PER_PEER {
            peer.push(stream);
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance advertising an unspecified address is never dialled: the dial would reach the
    /// forwarding instance itself (every instance listens on the same port), and the lookup would go round
    /// until its hops ran out, answered as "shards are moving".
    #[tokio::test]
    async fn an_unspecified_address_is_not_forwarded_to() {
        for addr in ["0.0.0.0:9464", "[::]:9464"] {
            let why = unroutable(addr).expect("unroutable");
            assert!(why.contains("http.advertised_address"), "{why}");
            let err = http_get(
                addr,
                "/internal/v1/profiles/p",
                None,
                Duration::from_secs(1),
            )
            .await
            .expect_err("not dialled");
            assert_eq!(err.to_string(), why);
        }
        for addr in [
            "127.0.0.1:9464",
            "pod-0.stitcher-headless:9464",
            "[::1]:9464",
        ] {
            assert_eq!(unroutable(addr), None, "{addr}");
        }
    }

    fn assignment(topics: &[(&str, &[i32])]) -> Vec<u8> {
        let mut b = vec![0, 1];
        b.extend((topics.len() as i32).to_be_bytes());
        for (t, ps) in topics {
            b.extend((t.len() as i16).to_be_bytes());
            b.extend(t.as_bytes());
            b.extend((ps.len() as i32).to_be_bytes());
            for p in *ps {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend((-1i32).to_be_bytes()); // no user data
        b
    }

    #[test]
    fn shards_come_from_the_members_assignment() {
        let a = assignment(&[("web", &[0, 1]), ("shards", &[3, 7, 11]), ("pos", &[2])]);
        assert_eq!(assigned_partitions(&a, "shards"), vec![3, 7, 11]);
        assert_eq!(assigned_partitions(&a, "web"), vec![0, 1]);
        assert!(assigned_partitions(&a, "none").is_empty());
        // Truncated or garbage bytes give nothing rather than a panic.
        assert!(assigned_partitions(&a[..9], "shards").is_empty());
        assert!(assigned_partitions(&[0xff; 3], "shards").is_empty());
        assert_eq!(
            advertised_of(&client_id("10.1.2.3:9464")),
            Some("10.1.2.3:9464")
        );
        assert_eq!(advertised_of("rdkafka"), None);
    }

    /// A peer serving three lookups on one connection (two with a length, one chunked last): the client
    /// reuses the connection for the second and reads every body whole.
    #[tokio::test]
    async fn forwarded_lookups_reuse_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            let responses = [
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst".to_string(),
                "HTTP/1.1 404 Not Found\r\nContent-Length: 6\r\n\r\nsecond".to_string(),
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nthi\r\n2;x=y\r\nrd\r\n0\r\n\r\n"
                    .to_string(),
            ];
            let mut served = 0;
            while served < responses.len() {
                let (mut conn, _) = listener.accept().await.expect("accept");
                accepted += 1;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while served < responses.len() {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = conn.read(&mut chunk).await.expect("read");
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    if buf.is_empty() {
                        break;
                    }
                    buf.clear();
                    conn.write_all(responses[served].as_bytes())
                        .await
                        .expect("write");
                    served += 1;
                }
            }
            accepted
        });
        let t = Duration::from_secs(5);
        let first = http_get(&addr, "/a", Some("tok"), t).await.expect("first");
        assert_eq!(first, (200, b"first".to_vec()));
        let second = http_get(&addr, "/b", None, t).await.expect("second");
        assert_eq!(second, (404, b"second".to_vec()));
        let third = http_get(&addr, "/c", None, t).await.expect("third");
        assert_eq!(third, (200, b"third".to_vec()));
        assert_eq!(
            server.await.expect("server"),
            1,
            "one connection for all three"
        );
    }
}
