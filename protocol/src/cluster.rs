//! The Redis contract between engines (which publish) and routers (which read): key schema,
//! record encodings, liveness and update announcements, version [`SCHEMA_VERSION`].
//!
//! # Keys
//!
//! Every key of one service lives under `hotprefix:v1:{service}:` ([`Keys`]); many services can
//! share one Redis. `{service}` and replica ids are restricted to `[A-Za-z0-9._-]` (Kubernetes pod
//! names fit) so that no name can contain the `:` separator.
//!
//! | key | type | written by | content |
//! |:--|:--|:--|:--|
//! | `hotprefix:v1:{service}:replicas` | set | engine | ids of replicas that registered (a hint: liveness is the TTL keys below) |
//! | `hotprefix:v1:{service}:replica:{id}:info` | string, TTL | engine | [`Registration`], JSON |
//! | `hotprefix:v1:{service}:replica:{id}:load` | string, TTL | engine | [`LoadReport`], JSON |
//! | `hotprefix:v1:{service}:replica:{id}:summary` | string, TTL | engine | [`HotnessSummary`], binary |
//! | `hotprefix:v1:{service}:announce` | pub/sub channel | engine | [`Announcement`], text |
//!
//! **Liveness.** The three per-replica keys are written with a TTL of [`LIVENESS_TTL_MS`] and
//! refreshed every [`LOAD_INTERVAL_MS`] (load and registration) and [`SUMMARY_INTERVAL_MS`]
//! (summary). A replica whose `info` key has expired is dead: routers drop it and remove its id
//! from the `replicas` set. A replica that shuts down cleanly deletes its keys and announces
//! `leave`.
//!
//! **Announcements.** After each write the engine publishes one line on the channel, so routers
//! refresh what changed instead of polling in a tight loop. Pub/sub loses messages while a
//! router is disconnected, so routers also re-read everything every few seconds; announcements
//! only make updates arrive sooner.
//!
//! **Sequence numbers.** Load reports and summaries carry a sequence number that increases with
//! every write of that record by one engine process, so a router never replaces a newer record by
//! an older one read late. A restarted engine starts again from 1 with a new
//! `Registration::started_at_ms`; routers reset their sequence check when that changes.
//!
//! # Encodings
//!
//! Registration and load reports are small JSON objects (readable with `redis-cli`); both carry
//! `"schema": 1`. The summary is binary because it is large (up to [`MAX_SUMMARY_ENTRIES`]
//! entries; the default publisher sends 4,096, 70 KB) and routers decode it every second per
//! replica. All integers are little-endian:
//!
//! ```text
//! offset size  field
//! 0      4     magic "HPSM"
//! 4      2     schema version (1)
//! 6      2     flags (0; readers reject unknown flags)
//! 8      8     seq
//! 16     8     at_ms (Unix milliseconds when the summary was taken)
//! 24     4     block_size (tokens per block)
//! 28     4     count
//! 32     17*count entries: hash u64, hotness f32, depth u32, tier u8 (0 device, 1 host)
//! ```
//!
//! # Worked example
//!
//! Replica `engine-0` of service `chat`, serving `smollm2-135m-instruct.q4_1` with 16-token
//! blocks, holds one 32-token prefix: its first block on the device, its second in host memory.
//! Every second it runs:
//!
//! ```text
//! SET hotprefix:v1:chat:replica:engine-0:summary <bytes> PX 5000
//! PUBLISH hotprefix:v1:chat:announce "summary engine-0 7"
//! ```
//!
//! where `<bytes>` (66 bytes) is
//!
//! ```text
//! 48 50 53 4d  01 00  00 00                      "HPSM", schema 1, flags 0
//! 07 00 00 00 00 00 00 00                        seq 7
//! d0 cb 32 ef 90 01 00 00                        at_ms 1722000002000
//! 10 00 00 00  02 00 00 00                       block_size 16, 2 entries
//! 5b e1 d4 dc df 17 b1 80  00 00 40 40  01 00 00 00  00   block 1: device, hotness 3.0
//! 8d e5 04 60 0d cd 8b 76  00 00 80 3f  02 00 00 00  01   block 2: host, hotness 1.0
//! ```
//!
//! A router that receives a request for that model renders and tokenizes it as the engine does,
//! hashes its blocks with [`crate::hash_blocks`] under the replica's advertised salt and block
//! size, and finds the request's first two block hashes (`80b117dfdcd4e15b`, `768bcd0d6004e58d`)
//! in this summary: a two-block run, one block on the device. The test
//! `worked_example_bytes_are_pinned` pins these bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{BlockHash, ReplicaId, Salt, Tier};

/// Version of the key schema and encodings. Bump it (and `v1` in the key prefix, which follows
/// it) on any incompatible change: engines and routers of different schemas then use disjoint
/// keys instead of misreading each other.
pub const SCHEMA_VERSION: u32 = 1;

/// Root of every key.
pub const KEY_ROOT: &str = "hotprefix";

/// Per-replica keys expire this long after their last refresh: a replica that stops publishing
/// disappears from routers within this time.
pub const LIVENESS_TTL_MS: u64 = 5_000;

/// How often an engine refreshes its registration and load report.
pub const LOAD_INTERVAL_MS: u64 = 250;

/// How often an engine publishes its hotness summary.
pub const SUMMARY_INTERVAL_MS: u64 = 1_000;

/// Default number of entries in a hotness summary.
pub const DEFAULT_SUMMARY_ENTRIES: usize = 4_096;

/// Largest summary a reader accepts (entries).
pub const MAX_SUMMARY_ENTRIES: usize = 65_536;

/// Longest service name or replica id.
pub const MAX_NAME_LEN: usize = 253;

/// Magic bytes that open an encoded summary.
pub const SUMMARY_MAGIC: [u8; 4] = *b"HPSM";

const SUMMARY_HEADER: usize = 32;
const SUMMARY_ENTRY: usize = 17;

/// Why a name or a record read from Redis was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// A service name or replica id outside `[A-Za-z0-9._-]{1,253}`.
    #[error("invalid {what} {name:?}: use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ -")]
    BadName {
        /// Which kind of name.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A record of another schema version.
    #[error("record has schema version {0}, this build reads {SCHEMA_VERSION}")]
    Schema(u32),
    /// A record that does not decode.
    #[error("malformed {what}: {msg}")]
    Malformed {
        /// Which record.
        what: &'static str,
        /// What is wrong.
        msg: String,
    },
}

fn check_name(what: &'static str, name: &str) -> Result<(), ContractError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ContractError::BadName {
            what,
            name: name.to_string(),
        })
    }
}

impl ReplicaId {
    /// A replica id, checked to be usable in keys and announcements.
    pub fn parse(id: &str) -> Result<ReplicaId, ContractError> {
        check_name("replica id", id)?;
        Ok(ReplicaId(id.to_string()))
    }
}

/// The key names of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys of `service`, which must be a valid name.
    pub fn new(service: &str) -> Result<Keys, ContractError> {
        check_name("service name", service)?;
        Ok(Keys {
            prefix: format!("{KEY_ROOT}:v{SCHEMA_VERSION}:{service}"),
        })
    }

    /// The set of registered replica ids.
    pub fn replicas(&self) -> String {
        format!("{}:replicas", self.prefix)
    }

    /// A replica's [`Registration`].
    pub fn info(&self, id: &ReplicaId) -> String {
        format!("{}:replica:{id}:info", self.prefix)
    }

    /// A replica's [`LoadReport`].
    pub fn load(&self, id: &ReplicaId) -> String {
        format!("{}:replica:{id}:load", self.prefix)
    }

    /// A replica's [`HotnessSummary`].
    pub fn summary(&self, id: &ReplicaId) -> String {
        format!("{}:replica:{id}:summary", self.prefix)
    }

    /// The pub/sub channel of [`Announcement`]s.
    pub fn channel(&self) -> String {
        format!("{}:announce", self.prefix)
    }
}

/// Serialises a [`Salt`] as 16 hex digits: JSON numbers above 2^53 lose precision in many
/// readers (JavaScript, jq).
mod salt_hex {
    use super::Salt;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(salt: &Salt, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:016x}", salt.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Salt, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16)
            .map(Salt)
            .map_err(|_| serde::de::Error::custom(format!("salt {text:?} is not 16 hex digits")))
    }
}

/// What a replica serves and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The replica.
    pub replica: ReplicaId,
    /// Base URL routers send requests to (e.g. `http://10.0.0.7:8000`).
    pub url: String,
    /// The served model id (as in `/v1/models`).
    pub model: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Salt of its block hashes.
    #[serde(with = "salt_hex")]
    pub salt: Salt,
    /// [`crate::BLOCK_HASH_SCHEME`] of its block hashes.
    pub block_hash_scheme: u32,
    /// Unix milliseconds when this engine process started; changes on restart.
    pub started_at_ms: u64,
    /// Engine version.
    pub version: String,
}

/// A replica's load, refreshed every [`LOAD_INTERVAL_MS`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoadReport {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Increases with every report of one engine process.
    pub seq: u64,
    /// Unix milliseconds when the report was taken.
    pub at_ms: u64,
    /// Requests queued, not yet admitted.
    pub waiting: u32,
    /// Requests admitted (prefilling or decoding).
    pub running: u32,
    /// Prompt tokens admitted or queued that are not yet prefilled.
    pub pending_prefill_tokens: u64,
    /// KV blocks in use on the device tier.
    pub device_blocks_used: u64,
    /// KV blocks of the device tier.
    pub device_blocks_total: u64,
    /// KV blocks in use on the host tier.
    pub host_blocks_used: u64,
    /// KV blocks of the host tier.
    pub host_blocks_total: u64,
}

fn decode_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    schema: impl Fn(&T) -> u32,
) -> Result<T, ContractError> {
    let v: T = serde_json::from_slice(bytes).map_err(|e| ContractError::Malformed {
        what,
        msg: e.to_string(),
    })?;
    match schema(&v) {
        SCHEMA_VERSION => Ok(v),
        other => Err(ContractError::Schema(other)),
    }
}

impl Registration {
    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and checks the schema version and names.
    pub fn decode(bytes: &[u8]) -> Result<Registration, ContractError> {
        let r: Registration = decode_json("registration", bytes, |r: &Registration| r.schema)?;
        check_name("replica id", &r.replica.0)?;
        if r.block_size == 0 {
            return Err(ContractError::Malformed {
                what: "registration",
                msg: "block_size is 0".into(),
            });
        }
        Ok(r)
    }
}

impl LoadReport {
    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and checks the schema version.
    pub fn decode(bytes: &[u8]) -> Result<LoadReport, ContractError> {
        decode_json("load report", bytes, |r: &LoadReport| r.schema)
    }

    /// Fraction of the device tier in use, 0 when it has no blocks.
    pub fn device_utilisation(&self) -> f64 {
        if self.device_blocks_total == 0 {
            0.0
        } else {
            self.device_blocks_used as f64 / self.device_blocks_total as f64
        }
    }
}

/// One prefix block a replica holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SummaryEntry {
    /// Chained hash of the block (names the prefix that ends in it).
    pub hash: BlockHash,
    /// Where it is.
    pub tier: Tier,
    /// Decayed access count.
    pub hotness: f32,
    /// 1-based index of the block from the start of the sequence.
    pub depth: u32,
}

/// A replica's hottest resident prefix blocks.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HotnessSummary {
    /// Increases with every summary of one engine process.
    pub seq: u64,
    /// Unix milliseconds when it was taken.
    pub at_ms: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// Entries, hottest first (readers do not depend on the order).
    pub entries: Vec<SummaryEntry>,
}

impl HotnessSummary {
    /// The binary encoding documented in the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SUMMARY_HEADER + SUMMARY_ENTRY * self.entries.len());
        out.extend_from_slice(&SUMMARY_MAGIC);
        out.extend_from_slice(&(SCHEMA_VERSION as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.at_ms.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.hash.0.to_le_bytes());
            out.extend_from_slice(&e.hotness.to_le_bytes());
            out.extend_from_slice(&e.depth.to_le_bytes());
            out.push(match e.tier {
                Tier::Device => 0,
                Tier::Host => 1,
            });
        }
        out
    }

    /// Decodes a summary, checking every length and field.
    pub fn decode(bytes: &[u8]) -> Result<HotnessSummary, ContractError> {
        let bad = |msg: String| ContractError::Malformed {
            what: "summary",
            msg,
        };
        if bytes.len() < SUMMARY_HEADER {
            return Err(bad(format!(
                "{} bytes is shorter than the header",
                bytes.len()
            )));
        }
        if bytes[..4] != SUMMARY_MAGIC {
            return Err(bad("wrong magic".into()));
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let schema = u32::from(u16_at(4));
        if schema != SCHEMA_VERSION {
            return Err(ContractError::Schema(schema));
        }
        if u16_at(6) != 0 {
            return Err(bad(format!("unknown flags {:#x}", u16_at(6))));
        }
        let count = u32_at(28) as usize;
        if count > MAX_SUMMARY_ENTRIES {
            return Err(bad(format!(
                "{count} entries, more than the {MAX_SUMMARY_ENTRIES} allowed"
            )));
        }
        if bytes.len() != SUMMARY_HEADER + SUMMARY_ENTRY * count {
            return Err(bad(format!(
                "{} bytes for {count} entries (expected {})",
                bytes.len(),
                SUMMARY_HEADER + SUMMARY_ENTRY * count
            )));
        }
        let block_size = u32_at(24);
        if block_size == 0 {
            return Err(bad("block_size is 0".into()));
        }
        let mut entries = Vec::with_capacity(count);
        for e in bytes[SUMMARY_HEADER..].chunks_exact(SUMMARY_ENTRY) {
            let mut h = [0u8; 8];
            h.copy_from_slice(&e[..8]);
            let mut f = [0u8; 4];
            f.copy_from_slice(&e[8..12]);
            let hotness = f32::from_le_bytes(f);
            if !hotness.is_finite() {
                return Err(bad("non-finite hotness".into()));
            }
            let mut d = [0u8; 4];
            d.copy_from_slice(&e[12..16]);
            let tier = match e[16] {
                0 => Tier::Device,
                1 => Tier::Host,
                t => return Err(bad(format!("unknown tier {t}"))),
            };
            entries.push(SummaryEntry {
                hash: BlockHash(u64::from_le_bytes(h)),
                tier,
                hotness,
                depth: u32::from_le_bytes(d),
            });
        }
        Ok(HotnessSummary {
            seq: u64_at(8),
            at_ms: u64_at(16),
            block_size,
            entries,
        })
    }
}

/// One line on the announcement channel: `{kind} {replica} {seq}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announcement {
    /// The replica wrote its registration (first time, or again after Redis lost it).
    Registered(ReplicaId),
    /// A new load report with this sequence number.
    Load(ReplicaId, u64),
    /// A new summary with this sequence number.
    Summary(ReplicaId, u64),
    /// The replica shut down and deleted its keys.
    Left(ReplicaId),
}

impl fmt::Display for Announcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Announcement::Registered(id) => write!(f, "register {id} 0"),
            Announcement::Load(id, seq) => write!(f, "load {id} {seq}"),
            Announcement::Summary(id, seq) => write!(f, "summary {id} {seq}"),
            Announcement::Left(id) => write!(f, "leave {id} 0"),
        }
    }
}

impl Announcement {
    /// Parses one announcement line.
    pub fn parse(line: &str) -> Result<Announcement, ContractError> {
        let bad = || ContractError::Malformed {
            what: "announcement",
            msg: format!("{line:?} is not `kind replica seq`"),
        };
        let mut parts = line.split(' ');
        let (Some(kind), Some(id), Some(seq), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let id = ReplicaId::parse(id)?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        Ok(match kind {
            "register" => Announcement::Registered(id),
            "load" => Announcement::Load(id, seq),
            "summary" => Announcement::Summary(id, seq),
            "leave" => Announcement::Left(id),
            _ => return Err(bad()),
        })
    }

    /// The replica it is about.
    pub fn replica(&self) -> &ReplicaId {
        match self {
            Announcement::Registered(id)
            | Announcement::Load(id, _)
            | Announcement::Summary(id, _)
            | Announcement::Left(id) => id,
        }
    }
}

/// A Redis URL with its password (and user name) replaced by `***`, for logs and errors.
/// Anything that does not parse as `scheme://[user[:password]@]host...` is returned as
/// `<redacted>` whole if it contains an `@`, since it might hold a secret in an unexpected place.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('@') {
            "<redacted>".into()
        } else {
            url.to_string()
        };
    };
    // The authority ends at the first '/', '?' or '#'; credentials end at its last '@'.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}{tail}", &authority[at + 1..]),
        None if tail.contains('@') || tail.contains("password") => "<redacted>".into(),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_blocks;

    #[test]
    fn keys_are_namespaced_by_schema_service_and_replica() {
        let k = Keys::new("chat").unwrap();
        let id = ReplicaId::parse("engine-0").unwrap();
        assert_eq!(k.replicas(), "hotprefix:v1:chat:replicas");
        assert_eq!(k.info(&id), "hotprefix:v1:chat:replica:engine-0:info");
        assert_eq!(k.load(&id), "hotprefix:v1:chat:replica:engine-0:load");
        assert_eq!(k.summary(&id), "hotprefix:v1:chat:replica:engine-0:summary");
        assert_eq!(k.channel(), "hotprefix:v1:chat:announce");
        for bad in ["", "a:b", "a b", "é", &"x".repeat(254)] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
            assert!(ReplicaId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ReplicaId::parse("hps-engine-12.ns_1").is_ok());
    }

    #[test]
    fn contract_constants_are_pinned() {
        assert_eq!(SCHEMA_VERSION, 1);
        assert_eq!(LIVENESS_TTL_MS, 5_000);
        assert_eq!(LOAD_INTERVAL_MS, 250);
        assert_eq!(SUMMARY_INTERVAL_MS, 1_000);
        assert_eq!(DEFAULT_SUMMARY_ENTRIES, 4_096);
        assert_eq!(MAX_SUMMARY_ENTRIES, 65_536);
        // A replica refreshes its keys several times per TTL, so one lost write never
        // expires a live replica.
        const { assert!(LIVENESS_TTL_MS >= 4 * SUMMARY_INTERVAL_MS) };
    }

    #[test]
    fn worked_example_bytes_are_pinned() {
        let salt = Salt::new("smollm2-135m", None, None);
        let tokens: Vec<u32> = (0..32).collect();
        let h = hash_blocks(&tokens, 16, salt, BlockHash::ROOT);
        assert_eq!(h[0].to_string(), "80b117dfdcd4e15b");
        assert_eq!(h[1].to_string(), "768bcd0d6004e58d");
        let s = HotnessSummary {
            seq: 7,
            at_ms: 1_722_000_002_000,
            block_size: 16,
            entries: vec![
                SummaryEntry {
                    hash: h[0],
                    tier: Tier::Device,
                    hotness: 3.0,
                    depth: 1,
                },
                SummaryEntry {
                    hash: h[1],
                    tier: Tier::Host,
                    hotness: 1.0,
                    depth: 2,
                },
            ],
        };
        let bytes = s.encode();
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "48 50 53 4d 01 00 00 00 07 00 00 00 00 00 00 00 d0 cb 32 ef 90 01 00 00 10 00 00 00 \
             02 00 00 00 5b e1 d4 dc df 17 b1 80 00 00 40 40 01 00 00 00 00 8d e5 04 60 0d cd 8b \
             76 00 00 80 3f 02 00 00 00 01"
        );
        assert_eq!(bytes.len(), 66);
        assert_eq!(HotnessSummary::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn summaries_round_trip_and_malformed_ones_are_errors() {
        let s = HotnessSummary {
            seq: u64::MAX,
            at_ms: 1,
            block_size: 32,
            entries: (0..100u64)
                .map(|i| SummaryEntry {
                    hash: BlockHash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    tier: if i % 3 == 0 { Tier::Host } else { Tier::Device },
                    hotness: i as f32 * 0.5,
                    depth: i as u32 + 1,
                })
                .collect(),
        };
        let bytes = s.encode();
        assert_eq!(HotnessSummary::decode(&bytes).unwrap(), s);
        // Every truncation and every single-byte change either decodes or is an error.
        for cut in 0..bytes.len() {
            assert!(HotnessSummary::decode(&bytes[..cut]).is_err());
        }
        for i in 0..SUMMARY_HEADER + 2 * SUMMARY_ENTRY {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = HotnessSummary::decode(&b);
        }
        let mut b = bytes.clone();
        b[4] = 2;
        assert_eq!(HotnessSummary::decode(&b), Err(ContractError::Schema(2)));
        let mut b = bytes;
        b[SUMMARY_HEADER + 16] = 9;
        assert!(HotnessSummary::decode(&b).is_err());
        // A count larger than the limit is refused before anything is allocated.
        let big = HotnessSummary {
            block_size: 16,
            ..HotnessSummary::default()
        };
        let mut b = big.encode();
        b[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HotnessSummary::decode(&b).is_err());
    }

    #[test]
    fn json_records_round_trip_with_the_salt_in_hex() {
        let r = Registration {
            schema: SCHEMA_VERSION,
            replica: ReplicaId::parse("engine-0").unwrap(),
            url: "http://127.0.0.1:8001".into(),
            model: "smollm2-135m-instruct.q4_1".into(),
            block_size: 16,
            salt: Salt(0xb174_a1ca_4e6d_c195),
            block_hash_scheme: crate::BLOCK_HASH_SCHEME,
            started_at_ms: 5,
            version: "0.1.0".into(),
        };
        let bytes = r.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"salt\":\"b174a1ca4e6dc195\""), "{text}");
        assert_eq!(Registration::decode(&bytes).unwrap(), r);
        let mut old = r.clone();
        old.schema = 0;
        assert_eq!(
            Registration::decode(&old.encode()),
            Err(ContractError::Schema(0))
        );
        assert!(Registration::decode(b"{}").is_err());
        assert!(Registration::decode(b"not json").is_err());
        let l = LoadReport {
            schema: SCHEMA_VERSION,
            seq: 3,
            device_blocks_used: 5,
            device_blocks_total: 10,
            ..LoadReport::default()
        };
        assert_eq!(LoadReport::decode(&l.encode()).unwrap(), l);
        assert_eq!(l.device_utilisation(), 0.5);
        assert!(LoadReport::decode(&LoadReport::default().encode()).is_err());
    }

    #[test]
    fn announcements_round_trip_and_refuse_garbage() {
        let id = ReplicaId::parse("engine-1").unwrap();
        for a in [
            Announcement::Registered(id.clone()),
            Announcement::Load(id.clone(), 9),
            Announcement::Summary(id.clone(), u64::MAX),
            Announcement::Left(id.clone()),
        ] {
            assert_eq!(Announcement::parse(&a.to_string()).unwrap(), a);
            assert_eq!(a.replica(), &id);
        }
        for bad in [
            "",
            "load",
            "load engine-1",
            "load engine-1 x",
            "load a:b 1",
            "x e 1",
            "load e 1 2",
        ] {
            assert!(Announcement::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redacted_urls_keep_no_credentials() {
        assert_eq!(
            redact_url("redis://:s3cret@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:p@ss@host:6380"),
            "rediss://***@host:6380"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("user:pw@host"), "<redacted>");
        assert_eq!(redact_url("redis://host/?password=x@y"), "<redacted>");
        assert_eq!(redact_url("redis://host/0?password=x"), "<redacted>");
        for url in ["redis://:s3cret@h", "rediss://u:s3cret@h:1/2", "s3cret@h"] {
            assert!(!redact_url(url).contains("s3cret"));
        }
    }
}
