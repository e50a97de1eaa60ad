//! IP address management without a central allocator.
//!
//! A network's subnet is cut into blocks. A node claims a block in gossip, waits until the
//! claim has had time to reach every peer (the settle time), and then hands out addresses from
//! it alone. Concurrent claims on one block are resolved by the oldest stamp, the same way on
//! every node, so two nodes never allocate from the same block and addresses never repeat.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{Hash, Hasher},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use super::BlockClaim;
use mesh_api::id::Stamp;

/// Smallest and largest prefixes accepted for a network's subnet.
pub const MIN_PREFIX: u8 = 8;
pub const MAX_PREFIX: u8 = 29;

/// Blocks are 1/256th of the subnet but never smaller than 16 addresses (so a /24 gives 16
/// blocks of 16 and a /16 256 blocks of 256), and there are always at least 2 blocks.
pub fn block_prefix(subnet: Ipv4Net) -> u8 {
    let p = subnet.prefix_len();
    (p + 8).min(28).max(p + 1).min(30)
}

pub fn block_count(subnet: Ipv4Net) -> u32 {
    1 << (block_prefix(subnet) - subnet.prefix_len())
}

pub fn block(subnet: Ipv4Net, index: u32) -> Option<Ipv4Net> {
    if index >= block_count(subnet) {
        return None;
    }
    let size = 1u32 << (32 - block_prefix(subnet));
    let base = u32::from(subnet.network()) + index * size;
    Ipv4Net::new(Ipv4Addr::from(base), block_prefix(subnet)).ok()
}

pub fn block_index(subnet: Ipv4Net, ip: Ipv4Addr) -> Option<u32> {
    if !subnet.contains(&ip) {
        return None;
    }
    let size = 1u32 << (32 - block_prefix(subnet));
    Some((u32::from(ip) - u32::from(subnet.network())) / size)
}

/// The gateway address Docker reserves: the subnet's first host address.
pub fn default_gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Checks a subnet a user asked for.
pub fn validate_subnet(subnet: Ipv4Net) -> Result<(), String> {
    if subnet.network() != subnet.addr() {
        return Err(format!(
            "subnet {subnet} has host bits set: did you mean {}/{}?",
            subnet.network(),
            subnet.prefix_len()
        ));
    }
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&subnet.prefix_len()) {
        return Err(format!(
            "subnet {subnet} has prefix /{}: use a prefix between /{MIN_PREFIX} and /{MAX_PREFIX}",
            subnet.prefix_len()
        ));
    }
    Ok(())
}

/// The winning claim of every claimed block of one network: oldest stamp wins.
pub fn winners<'a>(claims: impl IntoIterator<Item = &'a BlockClaim>) -> BTreeMap<u32, Stamp> {
    let mut out: BTreeMap<u32, Stamp> = BTreeMap::new();
    for c in claims {
        out.entry(c.index)
            .and_modify(|s| {
                if c.stamp < *s {
                    *s = c.stamp.clone();
                }
            })
            .or_insert_with(|| c.stamp.clone());
    }
    out
}

/// Where a node starts looking for a free block: spread by node name so that nodes joining at
/// the same moment rarely race for the same block.
pub fn preferred_block(node: &str, count: u32) -> u32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    (h.finish() % u64::from(count)) as u32
}

/// The first block nobody claims, probing from the node's preferred block.
pub fn free_block(subnet: Ipv4Net, node: &str, claimed: &BTreeMap<u32, Stamp>) -> Option<u32> {
    let count = block_count(subnet);
    let start = preferred_block(node, count);
    (0..count)
        .map(|i| (start + i) % count)
        .find(|i| !claimed.contains_key(i))
}

/// The lowest free address in `blocks`, skipping the subnet's network and broadcast
/// addresses, the gateway, and anything in `used`.
pub fn allocate(
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    blocks: &[u32],
    used: &HashSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    blocks
        .iter()
        .filter_map(|&i| block(subnet, i))
        .find_map(|b| {
            let first = u32::from(b.network());
            let last = u32::from(b.broadcast());
            (first..=last).map(Ipv4Addr::from).find(|ip| {
                *ip != subnet.network()
                    && *ip != subnet.broadcast()
                    && *ip != gateway
                    && !used.contains(ip)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_cut_subnets_sensibly() {
        assert_eq!(block_count(net("10.0.0.0/24")), 16);
        assert_eq!(block(net("10.0.0.0/24"), 1), Some(net("10.0.0.16/28")));
        assert_eq!(block_count(net("10.0.0.0/16")), 256);
        assert_eq!(block(net("10.0.0.0/16"), 2), Some(net("10.0.2.0/24")));
        assert_eq!(block_count(net("10.0.0.0/28")), 2);
        assert_eq!(block(net("10.0.0.0/24"), 16), None);
        assert_eq!(
            block_index(net("10.0.0.0/24"), "10.0.0.37".parse().unwrap()),
            Some(2)
        );
    }

    #[test]
    fn allocation_skips_reserved_and_used_addresses() {
        let subnet = net("10.0.0.0/24");
        let gw = default_gateway(subnet);
        let mut used = HashSet::new();
        let first = allocate(subnet, gw, &[0], &used).unwrap();
        assert_eq!(first, "10.0.0.2".parse::<Ipv4Addr>().unwrap());
        used.insert(first);
        assert_eq!(
            allocate(subnet, gw, &[0], &used).unwrap(),
            "10.0.0.3".parse::<Ipv4Addr>().unwrap()
        );
        // The last block never hands out the broadcast address.
        let last: HashSet<Ipv4Addr> = (240..255).map(|o| Ipv4Addr::new(10, 0, 0, o)).collect();
        assert_eq!(allocate(subnet, gw, &[15], &last), None);
    }

    #[test]
    fn the_oldest_claim_wins() {
        let a = BlockClaim {
            network: "n".into(),
            index: 3,
            stamp: Stamp {
                ms: 10,
                node: "a".into(),
            },
        };
        let b = BlockClaim {
            network: "n".into(),
            index: 3,
            stamp: Stamp {
                ms: 9,
                node: "b".into(),
            },
        };
        assert_eq!(winners([&a, &b])[&3].node, "b");
        assert_eq!(winners([&b, &a])[&3].node, "b");
    }

    #[test]
    fn subnets_are_validated_with_a_hint() {
        assert!(validate_subnet(net("10.0.0.0/24")).is_ok());
        let e = validate_subnet(net("10.0.0.5/24")).unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/24"), "{e}");
        assert!(validate_subnet(net("10.0.0.0/31")).is_err());
    }
}
