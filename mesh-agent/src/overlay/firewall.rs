//! The node's nftables table (`inet mesh`): networks kept apart, and the gateway bridge's
//! masquerade.
//!
//! Every network's bridge carries the node's address and the tasks route through it, so
//! with IP forwarding on (the node routes for the load balancer and egress) the node would
//! happily route from one network's bridge into another's. Per bridge (each overlay network
//! and the gateway bridge) one rule refuses exactly that: traffic entering on it and leaving
//! on another of our bridges. Traffic to the node itself or out of the node is not affected.
//! The rejection is an ICMP admin-prohibited error, so a task gets a clean failure rather
//! than a timeout.
//!
//! The rule names the bridge itself as the one allowed way out rather than simply refusing
//! "our bridge to our bridge": with br_netfilter loaded and bridge-nf-call-iptables on (the
//! default in a fresh namespace), frames bridged inside a network also pass the forward
//! hook, with the bridge as both input and output.
//!
//! Tasks leave the node through the gateway bridge masqueraded behind the node's address,
//! like Docker's docker_gwbridge.

use std::borrow::Cow;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use nftables::{
    batch::Batch,
    expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix},
    helper::{self, NftablesError},
    schema::{Chain, NfListObject, NfObject, Nftables, Rule, Table},
    stmt::{Match, Operator, Reject, RejectType, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode},
};

use super::{BRIDGE_PREFIX, Change};

/// The nftables table the agent owns (family inet).
pub const NFT_TABLE: &str = "mesh";
const FORWARD: &str = "forward";
const POSTROUTING: &str = "postrouting";

/// What the table must hold.
#[derive(Clone, Debug)]
pub(super) struct Firewall {
    /// Every bridge of ours: one isolation rule each.
    pub bridges: Vec<String>,
    /// The gateway bridge and its subnet, masqueraded when leaving by any other interface.
    pub gateway: Option<(String, Ipv4Net)>,
}

impl Firewall {
    fn chains(&self) -> Vec<Chain<'static>> {
        let mut chains = vec![base_chain(FORWARD, NfChainType::Filter, NfHook::Forward, 0)];
        if self.gateway.is_some() {
            // srcnat priority.
            chains.push(base_chain(
                POSTROUTING,
                NfChainType::NAT,
                NfHook::Postrouting,
                100,
            ));
        }
        chains
    }

    fn rules(&self) -> Vec<(&'static str, Vec<Statement<'static>>)> {
        let mut rules: Vec<_> = self
            .bridges
            .iter()
            .map(|b| (FORWARD, isolation_rule(b)))
            .collect();
        if let Some((bridge, subnet)) = &self.gateway {
            rules.push((POSTROUTING, masquerade_rule(bridge, *subnet)));
        }
        rules
    }
}

fn base_chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: NFT_TABLE.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    }
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn name(n: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(n.to_owned()))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// `iifname B oifname "mbr*" oifname != B reject with icmpx admin-prohibited`
fn isolation_rule(bridge: &str) -> Vec<Statement<'static>> {
    vec![
        matches(meta(MetaKey::Iifname), Operator::EQ, name(bridge)),
        matches(
            meta(MetaKey::Oifname),
            Operator::EQ,
            name(&format!("{BRIDGE_PREFIX}*")),
        ),
        matches(meta(MetaKey::Oifname), Operator::NEQ, name(bridge)),
        Statement::Reject(Some(Reject::new(
            Some(RejectType::ICMPX),
            Some(RejectCode::AdminProhibited),
        ))),
    ]
}

/// `ip saddr SUBNET oifname != B masquerade`
fn masquerade_rule(bridge: &str, subnet: Ipv4Net) -> Vec<Statement<'static>> {
    let saddr = Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: "ip".into(),
            field: "saddr".into(),
        },
    )));
    let prefix = Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(name(&subnet.network().to_string())),
        len: subnet.prefix_len().into(),
    }));
    vec![
        matches(saddr, Operator::EQ, prefix),
        matches(meta(MetaKey::Oifname), Operator::NEQ, name(bridge)),
        Statement::Masquerade(None),
    ]
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: NFT_TABLE.into(),
        handle: None,
    }
}

/// Installs the table as `want` describes, unless it is already there exactly so.
pub(super) async fn ensure(want: Firewall, changes: &mut Vec<Change>) -> Result<()> {
    let installed = run_nft(move || {
        if let Some(current) = current()?
            && matches_ours(&current, &want)
        {
            return Ok(false);
        }
        // Re-created whole in one transaction: never a moment without the rules, and
        // anything someone added to our table is dropped.
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(table()));
        batch.delete(NfListObject::Table(table()));
        batch.add(NfListObject::Table(table()));
        for chain in want.chains() {
            batch.add(NfListObject::Chain(chain));
        }
        for (chain, expr) in want.rules() {
            batch.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: NFT_TABLE.into(),
                chain: chain.into(),
                expr: expr.into(),
                ..Default::default()
            }));
        }
        helper::apply_ruleset(&batch.to_nftables())
            .map_err(explain)
            .context("installing the mesh nftables table")?;
        Ok(true)
    })
    .await?;
    if installed {
        changes.push(Change::FirewallInstalled);
    }
    Ok(())
}

pub(super) async fn remove(changes: &mut Vec<Change>) -> Result<()> {
    let removed = run_nft(|| {
        if current()?.is_none() {
            return Ok(false);
        }
        let mut batch = Batch::new();
        batch.delete(NfListObject::Table(table()));
        helper::apply_ruleset(&batch.to_nftables())
            .map_err(explain)
            .context("removing the mesh nftables table")?;
        Ok(true)
    })
    .await?;
    if removed {
        changes.push(Change::FirewallRemoved);
    }
    Ok(())
}

/// Runs blocking `nft` invocations off the async workers (they inherit the network namespace
/// of the runtime's threads, which is the node's).
async fn run_nft<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("nft worker thread failed")?
}

/// Our table as nft lists it, or None if it does not exist.
fn current() -> Result<Option<Nftables<'static>>> {
    match helper::get_current_ruleset_with_args(
        helper::DEFAULT_NFT,
        ["list", "table", "inet", NFT_TABLE],
    ) {
        Ok(t) => Ok(Some(t)),
        Err(NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(e) => Err(explain(e)).context("reading the mesh nftables table"),
    }
}

fn matches_ours(listing: &Nftables, want: &Firewall) -> bool {
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    for obj in listing.objects.iter() {
        match obj {
            NfObject::ListObject(NfListObject::Chain(c)) => chains.push(c),
            NfObject::ListObject(NfListObject::Rule(r)) => rules.push(r),
            _ => {}
        }
    }
    let want_chains = want.chains();
    let chains_ok = chains.len() == want_chains.len()
        && want_chains.iter().all(|w| {
            chains.iter().any(|c| {
                c.name == w.name
                    && c._type == w._type
                    && c.hook == w.hook
                    && c.prio == w.prio
                    && c.policy == w.policy
            })
        });
    let want_rules = want.rules();
    chains_ok
        && rules.len() == want_rules.len()
        && rules
            .iter()
            .zip(&want_rules)
            .all(|(r, (chain, expr))| r.chain == *chain && r.expr.as_ref() == expr.as_slice())
}

fn explain(e: NftablesError) -> anyhow::Error {
    match e {
        NftablesError::NftExecution { inner, .. }
            if inner.kind() == std::io::ErrorKind::NotFound =>
        {
            anyhow::anyhow!("the nft command is missing: install the nftables package")
        }
        NftablesError::NftFailed { hint, stderr, .. } => {
            anyhow::anyhow!("nft failed while {hint}: {}", stderr.trim())
        }
        e => e.into(),
    }
}
