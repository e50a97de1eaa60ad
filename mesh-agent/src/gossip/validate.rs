//! Checks an opened gossip datagram before chitchat decodes and applies it.
//!
//! chitchat 0.13 trusts its peers: a delta with a `SetMaxVersion` op after a key-value op of
//! the same node makes `NodeState::apply_delta` trip an `assert!` inside the gossip task (and
//! gossip on that node ends); every node id named in a digest becomes a node state, so a
//! stream of digests naming new ids grows memory without bound; and a delta's blocks are
//! decompressed without a total limit. A key holder can send any of these (a compromised
//! node, or a bug in another version), so each datagram is read here first, mirroring
//! chitchat 0.13's wire format (`message_serialize.rs`, `digest.rs`, `delta.rs`,
//! `serialize.rs`), and dropped (counted as `invalid`) unless it is what chitchat itself
//! would send:
//!
//! - ops in a delta come in chitchat's order: a node op, then that node's key-values with
//!   strictly increasing versions above the delta's starting version, or instead a single
//!   `SetMaxVersion` (never after a key-value);
//! - a node appears once per delta; a digest or delta names at most [`MAX_NODES`] nodes, and
//!   digests may not introduce more than [`MAX_KNOWN_NODES`] distinct nodes per
//!   [`KNOWN_NODE_TTL`] (chitchat forgets a phantom node after its dead-node grace, 1 h);
//! - keys are at most [`MAX_KEY_LEN`] bytes, and a compressed stream at most
//!   [`MAX_DECOMPRESSED`] bytes once decompressed;
//! - (checked by the transport, which knows who it is) no delta is about the receiving node's
//!   own run: chitchat applies such a delta to the receiver's own state, so a member could
//!   replay a node's older signed records into that node itself — an admin's old service
//!   spec, which the admin then republishes as current. No honest peer sends one: a node's
//!   own digest always names its newest version;
//! - (checked by [`super::versions`], with what this parse returns of each node's part) every
//!   version a delta tells about a node is one that node signed.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

/// Nodes one digest or delta may name: about what fits one datagram (see FACTS: near 1,000
/// nodes a digest alone fills it).
pub const MAX_NODES: usize = 1024;
/// Distinct nodes (name and generation) digests may introduce within [`KNOWN_NODE_TTL`].
pub const MAX_KNOWN_NODES: usize = 4096;
/// Longer than chitchat's dead-node grace (1 h), after which it forgets a node that never
/// spoke.
pub const KNOWN_NODE_TTL: Duration = Duration::from_secs(2 * 3600);
/// mesh's keys are short (`chunk:obj:secret:<64-byte name>#<n>`).
pub const MAX_KEY_LEN: usize = 512;
/// chitchat decompresses every block of a stream into memory; legitimate streams of very
/// compressible values (a config of zeros) reach a few MB.
pub const MAX_DECOMPRESSED: usize = 16 << 20;

const MAGIC: u16 = 45_139;

/// A node as chitchat names it: name, generation, gossip address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub name: String,
    pub generation: u64,
    pub addr: SocketAddr,
}

/// What a valid datagram says, as far as later checks need.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Nodes its digest names (each becomes a node state in chitchat).
    pub digest_nodes: Vec<NodeId>,
    /// Nodes its delta carries state of.
    pub delta_nodes: Vec<NodeId>,
    /// Its delta, node by node (what [`super::versions`] checks).
    pub delta: Vec<NodePart>,
}

/// One node's part of a delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePart {
    pub id: NodeId,
    pub last_gc_version: u64,
    pub from_version_excluded: u64,
    pub key_values: Vec<KeyValueOp>,
    pub set_max_version: Option<u64>,
}

/// A key-value op as chitchat encodes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValueOp {
    pub key: String,
    pub value: String,
    pub version: u64,
    /// chitchat's deletion status: 0 set, 1 deleted, 2 deleted after a grace period.
    pub status: u8,
}

/// Reads one opened datagram; `Err` says why chitchat must not see it.
pub fn check(plaintext: &[u8]) -> Result<Checked, String> {
    let mut r = Reader(plaintext);
    if r.u16()? != MAGIC {
        return Err("not chitchat: bad magic number".into());
    }
    let version = r.u8()?;
    if version > 1 {
        return Err(format!("unknown protocol version {version}"));
    }
    let mut out = Checked::default();
    match r.u8()? {
        // Syn: digest, cluster id.
        0 => {
            out.digest_nodes = digest(&mut r, version)?;
            r.str()?;
        }
        // SynAck: digest, delta.
        1 => {
            out.digest_nodes = digest(&mut r, version)?;
            out.delta = delta(&mut r)?;
        }
        // Ack: delta.
        2 => out.delta = delta(&mut r)?,
        // BadCluster.
        3 => {}
        t => return Err(format!("unknown message type {t}")),
    }
    out.delta_nodes = out.delta.iter().map(|p| p.id.clone()).collect();
    Ok(out)
}

fn digest(r: &mut Reader, version: u8) -> Result<Vec<NodeId>, String> {
    let mut nodes = Vec::new();
    if version == 0 {
        let n = r.u16()? as usize;
        if n > MAX_NODES {
            return Err(format!("digest names {n} nodes (at most {MAX_NODES})"));
        }
        for _ in 0..n {
            nodes.push(node_digest(r)?);
        }
        return Ok(nodes);
    }
    let stream = decompress(r)?;
    let mut s = Reader(&stream);
    while !s.0.is_empty() {
        if nodes.len() == MAX_NODES {
            return Err(format!("digest names over {MAX_NODES} nodes"));
        }
        nodes.push(node_digest(&mut s)?);
    }
    Ok(nodes)
}

/// A node id followed by heartbeat, last GC version and max version.
fn node_digest(r: &mut Reader) -> Result<NodeId, String> {
    let id = r.node_id()?;
    r.u64()?;
    r.u64()?;
    r.u64()?;
    Ok(id)
}

/// One node's part of a delta, as far as the order rules need.
struct NodeOps {
    from_version_excluded: u64,
    last_version: Option<u64>,
    max_version_set: bool,
}

fn delta(r: &mut Reader) -> Result<Vec<NodePart>, String> {
    let stream = decompress(r)?;
    let mut s = Reader(&stream);
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut node: Option<NodeOps> = None;
    let mut parts: Vec<NodePart> = Vec::new();
    while !s.0.is_empty() {
        match s.u8()? {
            0 => {
                let id = s.node_id()?;
                let last_gc_version = s.u64()?;
                let from_version_excluded = s.u64()?;
                if seen.len() == MAX_NODES {
                    return Err(format!("delta names over {MAX_NODES} nodes"));
                }
                if !seen.insert(id.clone()) {
                    return Err(format!("delta names node {} twice", id.name));
                }
                node = Some(NodeOps {
                    from_version_excluded,
                    last_version: None,
                    max_version_set: false,
                });
                parts.push(NodePart {
                    id,
                    last_gc_version,
                    from_version_excluded,
                    key_values: Vec::new(),
                    set_max_version: None,
                });
            }
            1 => {
                let key = s.str()?;
                let value = s.str()?;
                let version = s.u64()?;
                let status = s.u8()?;
                let n = node.as_mut().ok_or("a key-value before any node")?;
                if n.max_version_set {
                    return Err("a key-value after SetMaxVersion".into());
                }
                if key.len() > MAX_KEY_LEN {
                    return Err(format!("a key of {} bytes", key.len()));
                }
                if status > 2 {
                    return Err(format!("unknown deletion status {status}"));
                }
                if version <= n.last_version.unwrap_or(n.from_version_excluded) {
                    return Err(format!(
                        "key-value versions must increase past {}: got {version}",
                        n.last_version.unwrap_or(n.from_version_excluded)
                    ));
                }
                n.last_version = Some(version);
                parts
                    .last_mut()
                    .expect("a node op came first")
                    .key_values
                    .push(KeyValueOp {
                        key: key.to_owned(),
                        value: value.to_owned(),
                        version,
                        status,
                    });
            }
            2 => {
                let max_version = s.u64()?;
                let n = node.as_mut().ok_or("SetMaxVersion before any node")?;
                if n.last_version.is_some() {
                    return Err("SetMaxVersion after a key-value of the same node".into());
                }
                if n.max_version_set {
                    return Err("SetMaxVersion twice for one node".into());
                }
                if max_version < n.from_version_excluded {
                    return Err(format!(
                        "SetMaxVersion {max_version} below the delta's starting version {}",
                        n.from_version_excluded
                    ));
                }
                n.max_version_set = true;
                parts
                    .last_mut()
                    .expect("a node op came first")
                    .set_max_version = Some(max_version);
            }
            t => return Err(format!("unknown delta op {t}")),
        }
    }
    Ok(parts)
}

/// chitchat's compressed stream: blocks (1 = zstd, 2 = stored) up to a 0.
fn decompress(r: &mut Reader) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut block = vec![0u8; u16::MAX as usize];
    loop {
        match r.u8()? {
            0 => return Ok(out),
            1 => {
                let len = r.u16()? as usize;
                let compressed = r.bytes(len)?;
                let n = zstd::bulk::decompress_to_buffer(compressed, &mut block[..])
                    .map_err(|e| format!("a block does not decompress: {e}"))?;
                push_limited(&mut out, &block[..n])?;
            }
            2 => {
                let len = r.u16()? as usize;
                let stored = r.bytes(len)?;
                push_limited(&mut out, stored)?;
            }
            t => return Err(format!("unknown block type {t}")),
        }
    }
}

fn push_limited(out: &mut Vec<u8>, more: &[u8]) -> Result<(), String> {
    if out.len() + more.len() > MAX_DECOMPRESSED {
        return Err(format!("decompresses to over {MAX_DECOMPRESSED} bytes"));
    }
    out.extend_from_slice(more);
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().expect("2")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8")))
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let len = self.u16()? as usize;
        std::str::from_utf8(self.bytes(len)?).map_err(|_| "a string that is not UTF-8".into())
    }

    fn node_id(&mut self) -> Result<NodeId, String> {
        let name = self.str()?.to_owned();
        let generation = self.u64()?;
        let ip: IpAddr = match self.u8()? {
            4 => Ipv4Addr::from(<[u8; 4]>::try_from(self.bytes(4)?).expect("4")).into(),
            6 => Ipv6Addr::from(<[u8; 16]>::try_from(self.bytes(16)?).expect("16")).into(),
            v => return Err(format!("unknown IP version {v}")),
        };
        let port = self.u16()?;
        Ok(NodeId {
            name,
            generation,
            addr: SocketAddr::new(ip, port),
        })
    }
}

/// The nodes digests introduced recently: what keeps a key holder from filling chitchat
/// with phantom nodes one datagram at a time.
#[derive(Debug, Default)]
pub struct KnownNodes {
    last_named: HashMap<NodeId, Instant>,
}

impl KnownNodes {
    /// Records the nodes a datagram's digest names, unless doing so would take the nodes
    /// named within [`KNOWN_NODE_TTL`] over [`MAX_KNOWN_NODES`].
    pub fn admit(&mut self, nodes: &[NodeId], now: Instant) -> Result<(), String> {
        let new = nodes
            .iter()
            .filter(|n| !self.last_named.contains_key(*n))
            .count();
        if new > 0 && self.last_named.len() + new > MAX_KNOWN_NODES {
            self.last_named
                .retain(|_, at| now.duration_since(*at) < KNOWN_NODE_TTL);
            if self.last_named.len() + new > MAX_KNOWN_NODES {
                return Err(format!(
                    "digest names {new} new nodes; {} already known within {} min (at most \
                     {MAX_KNOWN_NODES})",
                    self.last_named.len(),
                    KNOWN_NODE_TTL.as_secs() / 60
                ));
            }
        }
        for n in nodes {
            self.last_named.insert(n.clone(), now);
        }
        Ok(())
    }
}

/// chitchat 0.13's wire format, written by hand: what a hostile key holder can send. The
/// agent never uses it; the hostile-peer tests here and the scenario tests (`tests/trust.rs`)
/// play a compromised member with it.
pub mod craft {

    use std::net::SocketAddr;

    pub fn header(message_type: u8, version: u8) -> Vec<u8> {
        let mut b = 45_139u16.to_le_bytes().to_vec();
        b.push(version);
        b.push(message_type);
        b
    }

    pub fn str(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u16).to_le_bytes());
        b.extend(s.as_bytes());
    }

    pub fn node_id(b: &mut Vec<u8>, name: &str, generation: u64, addr: SocketAddr) {
        str(b, name);
        b.extend(generation.to_le_bytes());
        let SocketAddr::V4(a) = addr else {
            panic!("v4 only")
        };
        b.push(4);
        b.extend(a.ip().octets());
        b.extend(a.port().to_le_bytes());
    }

    /// A compressed stream of `items`, in zstd blocks as chitchat writes them.
    pub fn stream(b: &mut Vec<u8>, items: &[u8]) {
        for block in items.chunks(16_384) {
            let z = zstd::bulk::compress(block, 3).unwrap();
            b.push(1);
            b.extend((z.len() as u16).to_le_bytes());
            b.extend(z);
        }
        b.push(0);
    }

    pub fn node_op(b: &mut Vec<u8>, name: &str, generation: u64, addr: SocketAddr, from: u64) {
        node_op_gc(b, name, generation, addr, 0, from);
    }

    /// A node op carrying a last GC version.
    pub fn node_op_gc(
        b: &mut Vec<u8>,
        name: &str,
        generation: u64,
        addr: SocketAddr,
        last_gc: u64,
        from: u64,
    ) {
        b.push(0);
        node_id(b, name, generation, addr);
        b.extend(last_gc.to_le_bytes());
        b.extend(from.to_le_bytes());
    }

    pub fn kv_op(b: &mut Vec<u8>, key: &str, value: &str, version: u64) {
        kv_op_status(b, key, value, version, 0);
    }

    /// A key-value op with chitchat's deletion status (1 deleted, 2 deleted after a grace).
    pub fn kv_op_status(b: &mut Vec<u8>, key: &str, value: &str, version: u64, status: u8) {
        b.push(1);
        str(b, key);
        str(b, value);
        b.extend(version.to_le_bytes());
        b.push(status);
    }

    pub fn max_version_op(b: &mut Vec<u8>, version: u64) {
        b.push(2);
        b.extend(version.to_le_bytes());
    }

    /// A Syn whose digest (V1, compressed) names `names` at generation 1.
    pub fn syn_naming(
        cluster: &str,
        names: impl Iterator<Item = String>,
        addr: SocketAddr,
    ) -> Vec<u8> {
        syn_naming_at(cluster, names, 1, addr)
    }

    /// A Syn whose digest (V1, compressed) names `names` at `generation`.
    pub fn syn_naming_at(
        cluster: &str,
        names: impl Iterator<Item = String>,
        generation: u64,
        addr: SocketAddr,
    ) -> Vec<u8> {
        let mut b = header(0, 1);
        let mut entries = Vec::new();
        for n in names {
            node_id(&mut entries, &n, generation, addr);
            entries.extend(1u64.to_le_bytes()); // heartbeat
            entries.extend(0u64.to_le_bytes());
            entries.extend(0u64.to_le_bytes());
        }
        stream(&mut b, &entries);
        str(&mut b, cluster);
        b
    }

    /// An Ack whose delta is `ops`.
    pub fn ack(ops: &[u8]) -> Vec<u8> {
        let mut b = header(2, 0);
        stream(&mut b, ops);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::craft::*;
    use super::*;

    fn addr() -> SocketAddr {
        "192.0.2.1:7946".parse().unwrap()
    }

    #[test]
    fn chitchats_own_shapes_pass() {
        let syn = syn_naming("c", ["a", "b"].map(String::from).into_iter(), addr());
        assert_eq!(check(&syn).unwrap().digest_nodes.len(), 2);
        let mut ops = Vec::new();
        node_op(&mut ops, "a", 1, addr(), 3);
        kv_op(&mut ops, "k1", "v", 4);
        kv_op(&mut ops, "k2", "v", 9);
        node_op(&mut ops, "b", 1, addr(), 0);
        max_version_op(&mut ops, 7);
        check(&ack(&ops)).unwrap();
        check(&header(3, 0)).unwrap();
    }

    fn rejected(ops: &[u8], why: &str) {
        let e = check(&ack(ops)).unwrap_err();
        assert!(e.contains(why), "{e}");
    }

    #[test]
    fn ops_out_of_chitchats_order_are_rejected() {
        // The one that trips chitchat's assert.
        let mut ops = Vec::new();
        node_op(&mut ops, "a", 1, addr(), 0);
        kv_op(&mut ops, "k", "v", 5);
        max_version_op(&mut ops, 1);
        rejected(&ops, "SetMaxVersion after a key-value");

        let mut ops = Vec::new();
        kv_op(&mut ops, "k", "v", 5);
        rejected(&ops, "before any node");

        let mut ops = Vec::new();
        node_op(&mut ops, "a", 1, addr(), 0);
        kv_op(&mut ops, "k", "v", 5);
        kv_op(&mut ops, "k2", "v", 5);
        rejected(&ops, "must increase");

        let mut ops = Vec::new();
        node_op(&mut ops, "a", 1, addr(), 10);
        kv_op(&mut ops, "k", "v", 10);
        rejected(&ops, "must increase past 10");

        let mut ops = Vec::new();
        node_op(&mut ops, "a", 1, addr(), 0);
        max_version_op(&mut ops, 3);
        kv_op(&mut ops, "k", "v", 5);
        rejected(&ops, "after SetMaxVersion");

        let mut ops = Vec::new();
        node_op(&mut ops, "a", 1, addr(), 0);
        node_op(&mut ops, "a", 1, addr(), 0);
        rejected(&ops, "twice");

        let mut ops = Vec::new();
        node_op(&mut ops, "a", 1, addr(), 0);
        kv_op(&mut ops, &"k".repeat(MAX_KEY_LEN + 1), "v", 5);
        rejected(&ops, "a key of");
    }

    #[test]
    fn a_digest_of_too_many_nodes_is_rejected() {
        let syn = syn_naming("c", (0..10_000).map(|i| format!("phantom-{i}")), addr());
        assert!(syn.len() < 65_507, "fits a datagram: {} bytes", syn.len());
        assert!(check(&syn).unwrap_err().contains("over 1024 nodes"));
    }

    #[test]
    fn phantom_nodes_cannot_pile_up_one_datagram_at_a_time() {
        let mut known = KnownNodes::default();
        let now = Instant::now();
        let batch = |i: usize| -> Vec<NodeId> {
            (0..1000)
                .map(|j| NodeId {
                    name: format!("p{i}-{j}"),
                    generation: 1,
                    addr: addr(),
                })
                .collect()
        };
        for i in 0..4 {
            known.admit(&batch(i), now).unwrap();
        }
        // Nodes already known are always fine; new ones over the cap are not.
        known.admit(&batch(0), now).unwrap();
        assert!(known.admit(&batch(4), now).is_err());
        // Once chitchat has forgotten them, they no longer count.
        known.admit(&batch(4), now + KNOWN_NODE_TTL).unwrap();
    }

    #[test]
    fn a_decompression_bomb_is_rejected() {
        // 64 KB of zeros compresses to a few bytes; a datagram holds thousands of blocks.
        let zeros = zstd::bulk::compress(&[0u8; 65_535], 19).unwrap();
        let mut b = header(2, 0);
        for _ in 0..400 {
            b.push(1);
            b.extend((zeros.len() as u16).to_le_bytes());
            b.extend(&zeros);
        }
        b.push(0);
        assert!(b.len() < 65_507);
        assert!(check(&b).unwrap_err().contains("decompresses to over"));
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        for bytes in [
            &[][..],
            &[0x53, 0xb0],
            &[0x53, 0xb0, 0, 9],
            &[0x53, 0xb0, 7, 0],
            &[0x53, 0xb0, 0, 2, 1, 0xff, 0xff],
        ] {
            assert!(check(bytes).is_err(), "{bytes:?}");
        }
    }
}
