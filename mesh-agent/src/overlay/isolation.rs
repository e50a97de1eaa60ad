//! Keeps overlay networks apart on a node.
//!
//! Every network's bridge carries the node's address and the tasks route through it, so
//! with IP forwarding on (the node routes for the load balancer and egress) the host would
//! happily route from one network's bridge into another's. Per network one nftables rule
//! refuses exactly that: traffic entering on its bridge and leaving on another overlay
//! bridge. Traffic to the node itself or out of the node is not affected. The rejection is
//! an ICMP admin-prohibited error, so a task gets a clean failure rather than a timeout.
//!
//! The rule names the network's own bridge as the one allowed way out rather than simply
//! refusing "overlay bridge to overlay bridge": with br_netfilter loaded and
//! bridge-nf-call-iptables on (the default in a fresh namespace), frames bridged inside a
//! network also pass the forward hook, with the bridge as both input and output.

use std::borrow::Cow;

use anyhow::{Context, Result};
use nftables::{
    batch::Batch,
    expr::{Expression, Meta, MetaKey, NamedExpression},
    helper::{self, NftablesError},
    schema::{Chain, NfListObject, NfObject, Nftables, Rule, Table},
    stmt::{Match, Operator, Reject, RejectType, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode},
};

use super::{BRIDGE_PREFIX, Change};

/// The nftables table the overlay owns (family inet).
pub const ISOLATION_TABLE: &str = "mesh_overlay";
const CHAIN: &str = "forward";

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: ISOLATION_TABLE.into(),
        handle: None,
    }
}

fn chain() -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: ISOLATION_TABLE.into(),
        name: CHAIN.into(),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Forward),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    }
}

/// The rule of the network whose bridge is `bridge`.
fn rule(bridge: &str) -> Vec<Statement<'static>> {
    let meta = |key| Expression::Named(NamedExpression::Meta(Meta { key }));
    let name = |n: String| Expression::String(Cow::Owned(n));
    vec![
        Statement::Match(Match {
            left: meta(MetaKey::Iifname),
            right: name(bridge.to_owned()),
            op: Operator::EQ,
        }),
        Statement::Match(Match {
            left: meta(MetaKey::Oifname),
            right: name(format!("{BRIDGE_PREFIX}*")),
            op: Operator::EQ,
        }),
        Statement::Match(Match {
            left: meta(MetaKey::Oifname),
            right: name(bridge.to_owned()),
            op: Operator::NEQ,
        }),
        Statement::Reject(Some(Reject::new(
            Some(RejectType::ICMPX),
            Some(RejectCode::AdminProhibited),
        ))),
    ]
}

/// Installs the isolation table for the networks whose bridges are `bridges`, unless it is
/// already there exactly as we write it.
pub(super) async fn ensure(bridges: Vec<String>, changes: &mut Vec<Change>) -> Result<()> {
    run_nft(move || {
        if let Some(current) = current()?
            && matches_ours(&current, &bridges)
        {
            return Ok(false);
        }
        // Re-created whole in one transaction: never a moment without the rule, and
        // anything someone added to our table is dropped.
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(table()));
        batch.delete(NfListObject::Table(table()));
        batch.add(NfListObject::Table(table()));
        batch.add(NfListObject::Chain(chain()));
        for bridge in &bridges {
            batch.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: ISOLATION_TABLE.into(),
                chain: CHAIN.into(),
                expr: rule(bridge).into(),
                ..Default::default()
            }));
        }
        helper::apply_ruleset(&batch.to_nftables())
            .map_err(explain)
            .context("installing the overlay isolation rules")?;
        Ok(true)
    })
    .await?
    .then(|| changes.push(Change::IsolationInstalled));
    Ok(())
}

pub(super) async fn remove(changes: &mut Vec<Change>) -> Result<()> {
    run_nft(|| {
        if current()?.is_none() {
            return Ok(false);
        }
        let mut batch = Batch::new();
        batch.delete(NfListObject::Table(table()));
        helper::apply_ruleset(&batch.to_nftables())
            .map_err(explain)
            .context("removing the overlay isolation rules")?;
        Ok(true)
    })
    .await?
    .then(|| changes.push(Change::IsolationRemoved));
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
        ["list", "table", "inet", ISOLATION_TABLE],
    ) {
        Ok(t) => Ok(Some(t)),
        Err(NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(e) => Err(explain(e)).context("reading the overlay isolation rules"),
    }
}

fn matches_ours(listing: &Nftables, bridges: &[String]) -> bool {
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    for obj in listing.objects.iter() {
        match obj {
            NfObject::ListObject(NfListObject::Chain(c)) => chains.push(c),
            NfObject::ListObject(NfListObject::Rule(r)) => rules.push(r),
            _ => {}
        }
    }
    let want = chain();
    let chain_ok = chains.len() == 1
        && chains.iter().all(|c| {
            c.name == want.name
                && c._type == want._type
                && c.hook == want.hook
                && c.prio == want.prio
                && c.policy == want.policy
        });
    chain_ok
        && rules.len() == bridges.len()
        && rules
            .iter()
            .zip(bridges)
            .all(|(r, b)| r.chain == CHAIN && r.expr.as_ref() == rule(b))
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
