//! The tie-breaker as a key in etcd (`--tiebreak etcd://HOST:PORT,.../KEY-PREFIX/VM`), for
//! sites that run etcd already: no shared file system per VM, and etcd's own replication keeps
//! the record through the loss of a member. smpft grows no consensus of its own: etcd decides.
//!
//! The key holds the same text as the file ([`Record::encode`]). A claim reads the record and
//! applies [`decide`]; to write, it sends one transaction that puts the new record only if the
//! key's modification revision is still the one read (or, for a key never written, that it
//! still does not exist), and that otherwise returns the record as it is now, to decide again.
//! etcd commits a transaction only through its Raft leader with a quorum, and serves reads
//! linearizably (also through the quorum), so a claimant cut off from the majority neither wins
//! nor learns anything: its requests time out, and after the claim timeout the claim fails as an
//! unreachable file does.
//!
//! Members are asked one at a time, starting with the one that answered last; one that does
//! not answer within its share of the timeout (or answers with an error, e.g. "no leader") is
//! passed over for the next. A claim asked again after an answer was lost is safe: the rule is
//! idempotent for the holder (it finds itself holding the generation and wins without writing).
//!
//! The client is `etcd-client` (etcd's v3 gRPC API through tonic) on a current-thread tokio
//! runtime this tie-breaker owns: calls block the calling thread (a claim thread of the FT
//! shells), and no thread is started for it.

use super::spec::EtcdSpec;
use super::{decide, Decision, Observed, Outcome, Record, Status, TieBreak, TieBreakError};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetResponse, Txn, TxnOp, TxnOpResponse};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The least time a member is given to answer before the next is asked.
const MIN_TRY: Duration = Duration::from_millis(300);
/// The pause after every member failed once, before asking them again.
const ROUND_PAUSE: Duration = Duration::from_millis(50);
/// How many times in a row one claim may find the record changed under it.
const MAX_RACES: usize = 16;

pub struct EtcdTieBreaker {
    spec: EtcdSpec,
    owner: String,
    rt: tokio::runtime::Runtime,
    /// One client per member (its connection is made when first used).
    clients: Vec<Client>,
    /// The member that answered last, asked first.
    preferred: AtomicUsize,
    observed: Observed,
}

/// Why one member's attempt failed.
enum Fail {
    /// Ask again (this member or the next).
    Retry(String),
    /// The record cannot be parsed: never a win.
    Corrupt(&'static str),
}

/// The record in a get's answer, and the key's modification revision (`None`: no key).
type Found = (Option<Record>, Option<i64>);

impl EtcdTieBreaker {
    pub fn new(spec: EtcdSpec, owner: &str) -> Result<EtcdTieBreaker, TieBreakError> {
        let at = spec.to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| TieBreakError::Runtime { at: at.clone(), source })?;
        let mut options = ConnectOptions::new().with_require_leader(true).with_connect_timeout(Duration::from_secs(1));
        let scheme = if let Some(t) = &spec.tls {
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.client {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
            "https"
        } else {
            "http"
        };
        let clients = spec
            .endpoints
            .iter()
            .map(|e| rt.block_on(Client::connect([format!("{scheme}://{e}")], Some(options.clone()))))
            .collect::<Result<Vec<Client>, _>>()
            .map_err(|e| TieBreakError::Etcd { at: at.clone(), why: why(&e) })?;
        Ok(EtcdTieBreaker {
            owner: owner.to_string(),
            rt,
            clients,
            preferred: AtomicUsize::new(0),
            observed: Observed::new("etcd", at),
            spec,
        })
    }

    fn at(&self) -> String {
        self.spec.to_string()
    }

    /// Runs `op` against one member after another until one answers or `timeout` is over;
    /// the answer and the member's index.
    fn ask<T, F, Fut>(&self, timeout: Duration, op: F) -> Result<(T, usize), TieBreakError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Fail>>,
    {
        let n = self.clients.len();
        let per_try = (timeout / n as u32).max(MIN_TRY);
        let first = self.preferred.load(Relaxed) % n;
        self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut last = String::from("no member was asked");
            // A refusal that says why (a TLS alert): a member closing the connection right after
            // one may be all the next attempt sees.
            let mut telling: Option<String> = None;
            let mut i = first;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    let last = self.hint(telling.unwrap_or(last));
                    return Err(TieBreakError::NoQuorum { at: self.at(), timeout, last });
                }
                let t = per_try.min(left);
                let member = &self.spec.endpoints[i];
                match tokio::time::timeout(t, op(self.clients[i].clone())).await {
                    Ok(Ok(v)) => {
                        self.preferred.store(i, Relaxed);
                        return Ok((v, i));
                    }
                    Ok(Err(Fail::Corrupt(detail))) => {
                        return Err(TieBreakError::Corrupt { at: self.at(), detail: detail.into() })
                    }
                    Ok(Err(Fail::Retry(why))) => {
                        last = format!("{member}: {why}");
                        if why.contains("certificate") || why.contains("alert") {
                            telling = Some(last.clone());
                        }
                    }
                    Err(_) => last = format!("{member}: no answer within {t:?}"),
                }
                tracing::debug!("tie-breaker: {last}");
                i = (i + 1) % n;
                if i == first {
                    tokio::time::sleep(ROUND_PAUSE.min(left)).await;
                }
            }
        })
    }

    /// `last` (a member's refusal), with what it may mean when the member does not say why: a
    /// member that wants a client certificate just closes the connection of one without.
    fn hint(&self, last: String) -> String {
        match &self.spec.tls {
            Some(t) if t.client.is_none() => format!(
                "{last}; this host gives no client certificate: if the cluster asks for one \
                 (--client-cert-auth), give cert= and key="
            ),
            _ => last,
        }
    }

    /// Records what a request learnt, for [`TieBreak::status`].
    fn saw<T>(
        &self,
        start: Instant,
        r: &Result<(T, usize), TieBreakError>,
        record: Option<Option<Record>>,
        last: &str,
    ) {
        match r {
            Ok((_, i)) => self.observed.saw(start, Some(self.spec.endpoints[*i].clone()), record, last.into()),
            Err(e) => self.observed.saw(start, None, None, crate::error::error_chain(e)),
        }
    }
}

/// The record and revision a get found.
fn found(resp: &GetResponse) -> Result<Found, Fail> {
    match resp.kvs().first() {
        None => Ok((None, None)),
        Some(kv) => {
            let text = std::str::from_utf8(kv.value()).map_err(|_| Fail::Corrupt("not text"))?;
            Ok((Some(Record::decode(text).map_err(Fail::Corrupt)?), Some(kv.mod_revision())))
        }
    }
}

/// The transaction's condition: the key is as `revision` says (`None`: it does not exist).
fn unchanged(key: &str, revision: Option<i64>) -> Compare {
    match revision {
        Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    }
}

/// The record in a failed transaction's `or_else` get.
fn found_in_else(ops: &[TxnOpResponse]) -> Result<Found, Fail> {
    match ops.first() {
        Some(TxnOpResponse::Get(g)) => found(g),
        _ => Err(Fail::Retry("the transaction's answer lacks the record".into())),
    }
}

/// One attempt at a claim on one member.
async fn claim_on(mut c: Client, key: String, generation: u64, holder: String) -> Result<(Outcome, Record), Fail> {
    let mut current = found(&c.get(key.as_str(), None).await.map_err(retry)?)?;
    for _ in 0..MAX_RACES {
        match decide(current.0.as_ref(), generation, &holder) {
            Decision::Lost(r) => return Ok((r.lost(), r)),
            Decision::Held => return Ok((Outcome::Won { generation }, Record { generation, holder })),
            Decision::Write => {
                let rec = Record { generation, holder: holder.clone() };
                let txn = Txn::new()
                    .when([unchanged(&key, current.1)])
                    .and_then([TxnOp::put(key.as_str(), rec.encode(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let r = c.txn(txn).await.map_err(retry)?;
                if r.succeeded() {
                    return Ok((Outcome::Won { generation }, rec));
                }
                current = found_in_else(&r.op_responses())?;
            }
        }
    }
    Err(Fail::Retry(format!("the record changed under {MAX_RACES} attempts in a row")))
}

/// One attempt at clearing on one member: `true` if the key is gone, `false` if it holds
/// another record than `expected`.
async fn clear_on(mut c: Client, key: String, expected: Record) -> Result<bool, Fail> {
    let (current, rev) = found(&c.get(key.as_str(), None).await.map_err(retry)?)?;
    match current {
        None => Ok(true),
        Some(r) if r != expected => Ok(false),
        Some(_) => {
            let txn = Txn::new().when([unchanged(&key, rev)]).and_then([TxnOp::delete(key.as_str(), None)]);
            Ok(c.txn(txn).await.map_err(retry)?.succeeded())
        }
    }
}

fn retry(e: etcd_client::Error) -> Fail {
    Fail::Retry(why(&e))
}

/// An etcd client error with its causes (its own type does not chain them).
fn why(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::TransportError(t) => crate::error::error_chain(t),
        etcd_client::Error::GRpcStatus(s) => {
            let mut text = s.message().to_string();
            let mut source = std::error::Error::source(s);
            while let Some(c) = source {
                let more = c.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                source = c.source();
            }
            if text.is_empty() {
                format!("{:?}", s.code())
            } else {
                text
            }
        }
        other => other.to_string(),
    }
}

impl TieBreak for EtcdTieBreaker {
    fn owner(&self) -> &str {
        &self.owner
    }

    fn read(&self, timeout: Duration) -> Result<Option<Record>, TieBreakError> {
        let start = Instant::now();
        let key = self.spec.key.clone();
        let r = self.ask(timeout, |mut c| {
            let key = key.clone();
            async move { found(&c.get(key, None).await.map_err(retry)?) }
        });
        let record = r.as_ref().ok().map(|((rec, _), _)| rec.clone());
        self.saw(start, &r, record, "read");
        r.map(|((rec, _), _)| rec)
    }

    fn claim_as(&self, generation: u64, holder: &str, timeout: Duration) -> Result<Outcome, TieBreakError> {
        let start = Instant::now();
        let key = self.spec.key.clone();
        let r = self.ask(timeout, |c| claim_on(c, key.clone(), generation, holder.to_string()));
        let (record, last) = match &r {
            Ok(((o, rec), _)) => {
                (Some(Some(rec.clone())), if matches!(o, Outcome::Won { .. }) { "won" } else { "lost" })
            }
            Err(_) => (None, ""),
        };
        self.saw(start, &r, record, last);
        r.map(|((o, _), _)| o)
    }

    fn clear(&self, expected: &Record, timeout: Duration) -> Result<bool, TieBreakError> {
        let start = Instant::now();
        let key = self.spec.key.clone();
        let r = self.ask(timeout, |c| clear_on(c, key.clone(), expected.clone()));
        let cleared = matches!(r, Ok((true, _)));
        self.saw(start, &r, cleared.then_some(None), if cleared { "cleared" } else { "changed" });
        r.map(|(c, _)| c)
    }

    fn status(&self) -> Status {
        self.observed.get()
    }
}
