//! subnet-manager against a real etcd on loopback: allocation races, Flannel's JSON, renewal,
//! expiry, malformed leases and the watch.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use netns_tests::etcd::Etcd;
use subnet_manager::alloc::Identity;
use subnet_manager::lease::{LeaseAttrs, SubnetKey};
use subnet_manager::lifecycle::{self, AcquireError, LeaseRequest};
use subnet_manager::registry::{EtcdOptions, Registry};
use subnet_manager::watch::{self, LeaseEvent};

const PREFIX: &str = "/coreos.com/network";

fn start_etcd() -> Result<(Etcd, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::on_loopback(dir.path())?;
    Ok((etcd, dir))
}

async fn registry(etcd: &Etcd) -> Result<Registry> {
    Ok(Registry::connect(&EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: PREFIX.into(),
        ..EtcdOptions::default()
    })
    .await?)
}

/// etcd with Network 10.244.0.0/16 configured, a registry on it and that config.
async fn etcd_with_network() -> Result<(
    Etcd,
    tempfile::TempDir,
    Registry,
    subnet_manager::config::NetworkConfig,
)> {
    let (etcd, dir) = start_etcd()?;
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.244.0.0/16"}"#,
    )?;
    let reg = registry(&etcd).await?;
    let config = reg.network_config().await?;
    Ok((etcd, dir, reg, config))
}

fn request(
    registry_config: subnet_manager::config::NetworkConfig,
    ip: Ipv4Addr,
    ttl: Duration,
) -> LeaseRequest {
    LeaseRequest {
        config: registry_config,
        identity: Identity {
            public_ip: ip,
            public_ipv6: None,
        },
        attrs: LeaseAttrs {
            public_ip: ip,
            public_ipv6: None,
            backend_type: Some("host-gw".into()),
            backend_data: None,
            backend_v6_data: None,
        },
        previous: None,
        ttl,
    }
}

/// `racers` managers start at once on a pool of `pool` subnets: exactly `pool` win, with
/// distinct subnets; the rest get the full-pool error naming the pool size; nothing partial.
async fn race(racers: u8, config: &str, pool: usize) -> Result<()> {
    let (etcd, _dir) = start_etcd()?;
    etcd.put(&format!("{PREFIX}/config"), config)?;
    let mut tasks = Vec::new();
    for i in 1..=racers {
        let reg = registry(&etcd).await?;
        tasks.push(tokio::spawn(async move {
            let config = reg.network_config().await?;
            let req = request(
                config,
                Ipv4Addr::new(192, 168, 0, i),
                Duration::from_secs(600),
            );
            lifecycle::acquire(&reg, &req)
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    let mut won = Vec::new();
    let mut full = 0;
    for t in tasks {
        match t.await? {
            Ok(held) => won.push(held.key.to_string()),
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(
                    matches!(
                        e.downcast_ref::<AcquireError>(),
                        Some(AcquireError::Alloc(_))
                    ),
                    "unexpected error: {msg}"
                );
                assert!(
                    msg.contains(&pool.to_string()),
                    "full-pool error should say how many subnets: {msg}"
                );
                full += 1;
            }
        }
    }
    won.sort();
    let before = won.len();
    won.dedup();
    assert_eq!(won.len(), before, "two racers got the same subnet: {won:?}");
    assert_eq!(won.len(), pool, "winners: {won:?}");
    assert_eq!(full, usize::from(racers) - pool);
    assert_eq!(
        etcd.list(&format!("{PREFIX}/subnets/"))?.len(),
        pool,
        "no partial lease left"
    );
    for w in &won {
        assert!(
            !w.ends_with(".0.0-29"),
            "the first subnet is never handed out: {w}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_racers_for_seven_subnets() -> Result<()> {
    race(
        20,
        r#"{"Network":"10.10.0.0/26","SubnetLen":29,"Backend":{"Type":"host-gw"}}"#,
        7,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_racers_for_thirty_one_subnets() -> Result<()> {
    race(
        50,
        r#"{"Network":"10.20.0.0/24","SubnetLen":29,"Backend":{"Type":"host-gw"}}"#,
        31,
    )
    .await
}

#[tokio::test]
async fn lease_json_is_flannels_and_reclaimed_by_public_ip() -> Result<()> {
    let (etcd, _dir) = start_etcd()?;
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
    )?;
    let reg = registry(&etcd).await?;
    let config = reg.network_config().await?;
    let ip = Ipv4Addr::new(192, 168, 1, 10);
    let held =
        lifecycle::acquire(&reg, &request(config.clone(), ip, Duration::from_secs(600))).await?;
    let key = held.key.to_key(PREFIX);
    assert!(
        key.starts_with("/coreos.com/network/subnets/10.244."),
        "{key}"
    );
    assert!(key.ends_with("-24"), "{key}");
    assert_eq!(
        etcd.get(&key)?.as_deref(),
        Some(r#"{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"host-gw"}"#)
    );
    // A restart (new client, no subnet.env) finds its lease by PublicIP.
    let again = lifecycle::acquire(
        &registry(&etcd).await?,
        &request(config, ip, Duration::from_secs(600)),
    )
    .await?;
    assert_eq!(again.key, held.key);
    assert_eq!(etcd.list(&format!("{PREFIX}/subnets/"))?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn short_ttl_is_renewed_and_expires_without_renewal() -> Result<()> {
    let (etcd, _dir, reg, config) = etcd_with_network().await?;
    let ttl = Duration::from_secs(2);
    let mut kept = lifecycle::acquire(
        &reg,
        &request(config.clone(), Ipv4Addr::new(10, 0, 0, 1), ttl),
    )
    .await?;
    let dropped =
        lifecycle::acquire(&reg, &request(config, Ipv4Addr::new(10, 0, 0, 2), ttl)).await?;
    let renewing = {
        let reg = reg.clone();
        tokio::spawn(async move {
            lifecycle::keep_renewed(&reg, &mut kept, Duration::from_secs(3600), |_| {}).await
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        etcd.get(&dropped.key.to_key(PREFIX))?.is_none(),
        "unrenewed lease should expire"
    );
    let leases = etcd.list(&format!("{PREFIX}/subnets/"))?;
    assert_eq!(leases.len(), 1, "the renewed lease stays: {leases:?}");
    assert!(!renewing.is_finished());
    // Deleting the key makes the renewer report the loss instead of resurrecting it.
    etcd.ctl(&["del", &leases[0].0])?;
    let lost = tokio::time::timeout(Duration::from_secs(5), renewing).await??;
    assert!(matches!(lost, lifecycle::LeaseLost::Deleted), "{lost:?}");
    Ok(())
}

/// A renewal re-puts our value only while the key is on our grant: a key someone else wrote
/// (another node's grant, or a plain put) is reported, not overwritten.
#[tokio::test]
async fn renewal_does_not_overwrite_a_key_someone_else_wrote() -> Result<()> {
    let (etcd, _dir, reg, config) = etcd_with_network().await?;
    let ttl = Duration::from_secs(2);
    let mut held =
        lifecycle::acquire(&reg, &request(config, Ipv4Addr::new(10, 0, 0, 1), ttl)).await?;
    let key = held.key.to_key(PREFIX);
    let theirs = r#"{"PublicIP":"10.0.0.9","BackendType":"host-gw"}"#;
    etcd.put(&key, theirs)?;
    let lost = tokio::time::timeout(
        Duration::from_secs(5),
        lifecycle::keep_renewed(&reg, &mut held, Duration::from_secs(3600), |_| {}),
    )
    .await?;
    assert!(matches!(lost, lifecycle::LeaseLost::Rewritten), "{lost:?}");
    assert_eq!(etcd.get(&key)?.as_deref(), Some(theirs), "theirs stays");
    Ok(())
}

/// Putting our lease back over a value we read lands only while nobody has written the key
/// since: a node that took the subnet in between keeps it.
#[tokio::test]
async fn putting_our_lease_back_does_not_overwrite_a_newer_value() -> Result<()> {
    let (etcd, _dir, reg, config) = etcd_with_network().await?;
    let ttl = Duration::from_secs(60);
    let req = request(config, Ipv4Addr::new(10, 0, 0, 1), ttl);
    let held = lifecycle::acquire(&reg, &req).await?;
    let key = held.key.to_key(PREFIX);
    etcd.put(&key, r#"{"PublicIP":"10.0.0.9","BackendType":"host-gw"}"#)?;
    let read = reg
        .lease_key_now(&held.key)
        .await?
        .expect("the key is there");
    assert_eq!(read.grant, 0, "a plain put");
    // Another node takes the key after our read.
    let newer = r#"{"PublicIP":"10.0.0.7","BackendType":"host-gw"}"#;
    etcd.put(&key, newer)?;
    let put = reg
        .put_lease_over(&held.key, &req.attrs, ttl, read.mod_revision)
        .await?;
    assert!(put.is_none(), "refused: the key changed since our read");
    assert_eq!(
        etcd.get(&key)?.as_deref(),
        Some(newer),
        "the newer value stays"
    );
    // Read again, the put lands.
    let read = reg
        .lease_key_now(&held.key)
        .await?
        .expect("the key is there");
    let put = reg
        .put_lease_over(&held.key, &req.attrs, ttl, read.mod_revision)
        .await?;
    assert!(
        put.is_some_and(|h| h.grant_id != 0),
        "put under a fresh grant"
    );
    let back = reg
        .lease_key_now(&held.key)
        .await?
        .expect("the key is there");
    assert_eq!(LeaseAttrs::from_json(&back.value)?, req.attrs, "ours again");
    Ok(())
}

#[tokio::test]
async fn malformed_leases_are_skipped_and_watch_follows_changes() -> Result<()> {
    let (etcd, _dir) = start_etcd()?;
    let sub = format!("{PREFIX}/subnets");
    etcd.put(
        &format!("{sub}/10.244.1.0-24"),
        r#"{"PublicIP":"172.30.0.11","BackendType":"host-gw"}"#,
    )?;
    etcd.put(&format!("{sub}/10.244.2.0-24"), "not json")?;
    etcd.put(
        &format!("{sub}/10.244.3.0-24"),
        r#"{"PublicIP":"300.1.1.1"}"#,
    )?;
    etcd.put(&format!("{sub}/garbage"), r#"{"PublicIP":"172.30.0.99"}"#)?;
    let reg = registry(&etcd).await?;
    let list = reg.list_leases().await?;
    assert_eq!(list.leases.len(), 1);
    assert_eq!(list.malformed.len(), 2, "{:?}", list.malformed);
    let text = list
        .malformed
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        text.contains("10.244.2.0-24") && text.contains("10.244.3.0-24"),
        "{text}"
    );
    assert!(text.contains("PublicIP"), "{text}");

    let mut events = watch::spawn(reg.clone());
    let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await?
        .unwrap_or_default();
    assert_eq!(first.len(), 1, "{first:?}");
    etcd.put(
        &format!("{sub}/10.244.4.0-24"),
        r#"{"PublicIP":"172.30.0.14","BackendType":"host-gw"}"#,
    )?;
    etcd.put(&format!("{sub}/10.244.5.0-24"), "{broken")?; // logged and skipped
    etcd.ctl(&["del", &format!("{sub}/10.244.1.0-24")])?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await?
            .unwrap_or_default();
        seen.extend(batch);
    }
    assert!(
        matches!(&seen[0], LeaseEvent::Added(l) if l.key == SubnetKey::parse("10.244.4.0-24")?)
    );
    assert!(
        matches!(&seen[1], LeaseEvent::Removed(l) if l.key == SubnetKey::parse("10.244.1.0-24")?)
    );
    assert!(
        reg.stats
            .malformed_leases
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    Ok(())
}

#[tokio::test]
async fn leases_are_listed_oldest_first_and_other_spellings_refused() -> Result<()> {
    let (etcd, _dir) = start_etcd()?;
    let sub = format!("{PREFIX}/subnets");
    // Written in this order; etcd's key order would be 10, 2, 9.
    for n in [9, 10, 2] {
        etcd.put(
            &format!("{sub}/10.244.{n}.0-24"),
            &format!(r#"{{"PublicIP":"172.30.0.{n}","BackendType":"host-gw"}}"#),
        )?;
    }
    // Another spelling of 10.244.2.0-24's key, with another value: it must not stand in
    // for that lease.
    etcd.put(
        &format!("{sub}/10.244.2.0-024"),
        r#"{"PublicIP":"172.30.0.66","BackendType":"host-gw"}"#,
    )?;
    let list = registry(&etcd).await?.list_leases().await?;
    let keys: Vec<String> = list.leases.iter().map(|l| l.key.to_string()).collect();
    assert_eq!(keys, ["10.244.9.0-24", "10.244.10.0-24", "10.244.2.0-24"]);
    assert_eq!(list.leases[2].attrs.public_ip, Ipv4Addr::new(172, 30, 0, 2));
    // Not a lease key at all, as Flannel ignores keys that are not `<subnet>-<len>`.
    assert!(list.malformed.is_empty(), "{:?}", list.malformed);
    assert!(list.unreadable.is_empty(), "{:?}", list.unreadable);
    Ok(())
}

#[tokio::test]
async fn a_refused_write_leaves_no_grant_behind() -> Result<()> {
    let (mut etcd, _dir) = start_etcd()?;
    etcd.enable_auth("node", "node-secret", PREFIX)?;
    // A role that may read the prefix but not write it: granting still works, the put not.
    etcd.make_read_only(PREFIX)?;
    let reg = Registry::connect(&EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: PREFIX.into(),
        username: Some("node".into()),
        password: Some("node-secret".into()),
        ..EtcdOptions::default()
    })
    .await?;
    let key = SubnetKey::parse("10.244.1.0-24")?;
    let attrs = LeaseAttrs::from_json(br#"{"PublicIP":"172.30.0.11","BackendType":"host-gw"}"#)?;
    for _ in 0..3 {
        let e = reg
            .create_lease(&key, &attrs, Duration::from_secs(600))
            .await
            .expect_err("the role may not write");
        assert!(e.to_string().contains("permission denied"), "{e}");
    }
    let grants = etcd.ctl(&["lease", "list"])?;
    assert!(grants.starts_with("found 0 leases"), "{grants}");
    Ok(())
}
