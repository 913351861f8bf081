//! Image privacy, in network namespaces: one host each for a buyer, two sellers
//! it granted, a stranger, and a DHT reader (the test itself, as a bare libp2p
//! peer), joined by a bridge.
//!
//! - The stranger (no grant) cannot get the manifest: `image fetch` exits non-zero
//!   with a one-line refusal, counted on the serving node.
//! - Nor any chunk: a bare peer asking the buyer for chunk 0, with no grant and
//!   with a grant it signed itself, is refused with the reason.
//! - A granted seller fetches from the buyer (handed its grant on request); a
//!   second granted seller (`image fetch --grant`) fetches from the first after
//!   the buyer is gone; the stranger is then refused by the sellers too.
//! - The DHT does not reveal the image id: from the reader, a provider lookup of
//!   the raw id finds nobody and a record lookup nothing, while the derived key
//!   finds the buyer.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use cpushare_tests::netns::{veth, Netns};
use cpushare_tests::node::NodeProc;
use cpushare_tests::swarm::random_file;
use cpushare_tests::{require_root, wait_until};
use futures::prelude::*;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity, kad, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};

const NET: &str = "10.231.0";
const PORT: u16 = 7460;
const V3: &str = "/cpushare/swarm/3";
const ACCEPT: u8 = 0xa5;
const MIB: usize = 1 << 20;

fn ip(i: usize) -> String {
    format!("{NET}.{}", 10 + i)
}

fn addr(i: usize, node: &NodeProc) -> String {
    format!("/ip4/{}/tcp/{PORT}/p2p/{}", ip(i), node.peer_id)
}

/// `n` hosts on one bridge; host `i` has address `ip(i)`.
fn world(tag: &str, n: usize) -> Result<(Netns, Vec<Netns>)> {
    let br = Netns::new(&format!("pv{tag}br"))?;
    br.ip(&["link", "add", "br0", "type", "bridge"])?;
    br.ip(&["link", "set", "br0", "up"])?;
    let mut hosts = Vec::new();
    for i in 0..n {
        let ns = Netns::new(&format!("pv{tag}h{i}"))?;
        let port = format!("pv{tag}p{i}");
        veth(&ns, "eth0", &format!("{}/24", ip(i)), &br, &port, "")?;
        br.ip(&["link", "set", &port, "master", "br0"])?;
        hosts.push(ns);
    }
    Ok((br, hosts))
}

fn spawn_in(ns: &Netns, i: usize, dir: &Path, role: &str, boot: &[String]) -> Result<NodeProc> {
    let listen = format!("/ip4/{}/tcp/{PORT}", ip(i));
    let mut args = vec!["--listen", &listen];
    for b in boot {
        args.extend(["--bootstrap", b.as_str()]);
    }
    NodeProc::spawn(&["ip", "netns", "exec", ns.name()], dir, role, &args)
}

fn refused(node: &NodeProc) -> u64 {
    node.status().map_or(0, |s| {
        s["p2p"]["rejected"]["refused_no_grant"]
            .as_u64()
            .unwrap_or(0)
    })
}

fn export(node: &NodeProc, id: &str, out: &Path) -> Result<Vec<u8>> {
    node.cli_ok(&["image", "export", id, out.to_str().expect("utf-8")])?;
    Ok(std::fs::read(out)?)
}

/// `image fetch` that must be refused: non-zero exit, one line naming why.
fn fetch_refused(node: &NodeProc, id: &str) -> Result<String> {
    let out = node.cli(&["image", "fetch", id])?;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    ensure!(
        !out.status.success(),
        "a node without a grant fetched the image: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let last = err.lines().last().unwrap_or_default().to_string();
    ensure!(
        last.contains("refused image") && last.contains("private") && last.contains("image grant"),
        "unclear refusal: {err}"
    );
    let ls = node.cli_ok(&["image", "ls", "--json"])?;
    ensure!(!ls.contains(id), "the refused node stored the image: {ls}");
    Ok(last)
}

#[test]
fn private_images_need_a_grant_and_the_dht_hides_their_ids() -> Result<()> {
    if !require_root("network namespaces") {
        return Ok(());
    }
    let tag = format!("{}", std::process::id() % 10_000);
    let (_br, hosts) = world(&tag, 6)?;
    let dir = tempfile::tempdir()?;
    let mut buyer = spawn_in(&hosts[0], 0, &dir.path().join("b"), "buyer", &[])?;
    let boot = vec![addr(0, &buyer)];
    let s1 = spawn_in(&hosts[1], 1, &dir.path().join("s1"), "seller", &boot)?;
    let boot1 = vec![addr(0, &buyer), addr(1, &s1)];
    let s2 = spawn_in(&hosts[2], 2, &dir.path().join("s2"), "seller", &boot1)?;
    let stranger = spawn_in(&hosts[3], 3, &dir.path().join("n"), "seller", &boot1)?;
    let s3 = spawn_in(&hosts[5], 5, &dir.path().join("s3"), "seller", &boot1)?;

    let file = dir.path().join("img.raw");
    let data = random_file(&file, 4 * MIB, 14)?;
    let out = buyer.cli_ok(&["image", "import", file.to_str().expect("utf-8")])?;
    let id = out.trim().to_string();
    ensure!(id.len() == 64, "import printed {out:?}");
    let image: [u8; 32] = hex::decode(&id)?.try_into().expect("32 bytes");

    // grants: s1 by the buyer's book (handed over on request), s2 on its command line
    buyer.cli_ok(&["image", "grant", &id, &s1.peer_id])?;
    buyer.cli_ok(&["image", "grant", &id, &s3.peer_id])?;
    let g2 = buyer.cli_ok(&["image", "grant", &id, &s2.peer_id, "--until", "1h"])?;
    let g2 = g2.trim().to_string();
    // a malformed grant on the command line: refused before anything moves
    let bad = stranger.cli(&["image", "fetch", &id, "--grant", "zz"])?;
    ensure!(!bad.status.success(), "a malformed grant was accepted");

    // 1. the stranger cannot get the manifest; the buyer counts the refusal
    let msg = fetch_refused(&stranger, &id)?;
    eprintln!("stranger: {msg}");
    ensure!(
        wait_until(Duration::from_secs(5), || refused(&buyer) >= 1),
        "the buyer did not count the refusal"
    );
    let refused_before_raw = refused(&buyer);

    // 2. the granted seller fetches it from the buyer
    s1.cli_ok(&["image", "fetch", &id])?;
    ensure!(
        export(&s1, &id, &dir.path().join("s1.out"))? == data,
        "s1's copy differs"
    );

    // 2b. a seller granted only in the buyer's book asks the buyer and s1 at
    //     once: s1 holds no grant for it and refuses, the buyer lets it in. The
    //     refusal must not end the fetch (it did when the refusal came first).
    let linked = || {
        s3.status().ok().is_some_and(|v| {
            v["p2p"]["connected_peers"]
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p == s1.peer_id.as_str()))
        })
    };
    ensure!(
        wait_until(Duration::from_secs(15), linked),
        "s3 did not connect to s1"
    );
    let s1_refused = refused(&s1);
    s3.cli_ok(&["image", "fetch", &id])?;
    ensure!(
        export(&s3, &id, &dir.path().join("s3.out"))? == data,
        "s3's copy differs"
    );
    ensure!(
        refused(&s1) > s1_refused,
        "s1 did not refuse s3 (the case this step is for did not happen)"
    );

    // 3. the DHT, from a bare peer on its own host; and chunk requests without a
    //    valid grant, straight to the buyer
    let b_peer: PeerId = buyer.peer_id.parse()?;
    let b_addr: Multiaddr = format!("/ip4/{}/tcp/{PORT}", ip(0)).parse()?;
    let s1_peer: PeerId = s1.peer_id.parse()?;
    let s1_addr: Multiaddr = format!("/ip4/{}/tcp/{PORT}", ip(1)).parse()?;
    let ns_path = format!("/run/netns/{}", hosts[4].name());
    let reader = std::thread::spawn(move || -> Result<Probe> {
        let f = std::fs::File::open(&ns_path)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(probe(image, [(b_peer, b_addr), (s1_peer, s1_addr)]))
    });
    let p = reader.join().expect("reader thread")?;
    eprintln!(
        "DHT: raw id -> {} providers, {} records; derived key -> {:?}; chunk 0 without a grant -> reason {}, with a self-signed one -> reason {}",
        p.raw_providers.len(),
        p.raw_records,
        p.derived_providers,
        p.no_grant,
        p.self_signed
    );
    ensure!(
        p.raw_providers.is_empty(),
        "the raw image id is a provider key: {:?}",
        p.raw_providers
    );
    ensure!(
        p.raw_records == 0,
        "a DHT record is stored under the raw image id"
    );
    ensure!(
        p.derived_providers.contains(&b_peer),
        "the derived key does not find the buyer: {:?}",
        p.derived_providers
    );
    ensure!(
        p.no_grant == 0,
        "chunk 0 without a grant: reply {}",
        p.no_grant
    );
    ensure!(
        p.self_signed == 3,
        "chunk 0 with a self-signed grant: reply {}",
        p.self_signed
    );
    ensure!(
        wait_until(Duration::from_secs(5), || refused(&buyer)
            >= refused_before_raw + 2),
        "the buyer did not count the refused chunk requests"
    );

    // 4. the buyer goes; the second granted seller gets it from the first
    buyer.kill9();
    s2.cli_ok(&["image", "fetch", &id, "--grant", &g2])?;
    ensure!(
        export(&s2, &id, &dir.path().join("s2.out"))? == data,
        "s2's copy differs"
    );
    // s1 counts a chunk as uploaded once s2 acknowledges it (its Have), which
    // may reach s1 after s2's fetch has returned.
    let uploaded = || {
        s1.status().ok().map_or(0, |v| {
            v["p2p"]["images"][&id]["uploaded_bytes"]
                .as_u64()
                .unwrap_or(0)
        })
    };
    wait_until(Duration::from_secs(15), || {
        uploaded() >= data.len() as u64 / 2
    });
    let up = uploaded();
    ensure!(
        up >= data.len() as u64 / 2,
        "s2 was not served by s1 (s1 uploaded {up} bytes)"
    );

    // 5. and the sellers refuse the stranger as the buyer did
    let before = refused(&s1) + refused(&s2);
    let msg = fetch_refused(&stranger, &id)?;
    eprintln!("stranger, sellers only: {msg}");
    ensure!(
        wait_until(Duration::from_secs(5), || refused(&s1) + refused(&s2)
            > before),
        "no seller counted the refusal"
    );
    Ok(())
}

/// What the bare peer saw.
struct Probe {
    raw_providers: HashSet<PeerId>,
    raw_records: usize,
    derived_providers: HashSet<PeerId>,
    /// The Denied reason byte (or 255 for another reply) to a chunk request
    /// without a grant and with a grant signed by the requester itself.
    no_grant: u8,
    self_signed: u8,
}

#[derive(NetworkBehaviour)]
struct Bare {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    stream: libp2p_stream::Behaviour,
}

async fn probe(image: [u8; 32], peers: [(PeerId, Multiaddr); 2]) -> Result<Probe> {
    let key = identity::Keypair::generate_ed25519();
    let secret: [u8; 32] = key
        .clone()
        .try_into_ed25519()?
        .secret()
        .as_ref()
        .try_into()
        .expect("32 bytes");
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|k| {
            let me = k.public().to_peer_id();
            let cfg = kad::Config::new(StreamProtocol::new("/cpushare/kad/1"));
            Bare {
                kad: kad::Behaviour::with_config(me, kad::store::MemoryStore::new(me), cfg),
                stream: libp2p_stream::Behaviour::new(),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client));
    for (p, a) in &peers {
        swarm.behaviour_mut().kad.add_address(p, a.clone());
    }
    let derived = blake3::derive_key("cpushare provider key v1", &image);

    // the buyer advertises every 2 s at most: wait for the derived key to show
    let mut derived_providers = HashSet::new();
    for _ in 0..15 {
        derived_providers = providers(&mut swarm, &derived).await?;
        if derived_providers.contains(&peers[0].0) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let raw_providers = providers(&mut swarm, &image).await?;
    let raw_records = records(&mut swarm, &image).await?;

    // chunk requests on the swarm protocol, the swarm driven in the background
    let mut ctl = swarm.behaviour().stream.new_control();
    let mut replies = ctl.accept(StreamProtocol::new(V3))?;
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let buyer = peers[0].0;
    let mut s = ctl
        .open_stream(buyer, StreamProtocol::new(V3))
        .await
        .context("opening a swarm stream to the buyer")?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .context("no accept byte")??;
    let frame = |tag: u8, body: &[u8]| {
        let mut m = vec![tag];
        m.extend_from_slice(&image);
        m.extend_from_slice(body);
        let mut f = (m.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&m);
        f
    };
    s.write_all(&frame(7, &0u32.to_le_bytes())).await?;
    s.flush().await?;
    let (_, mut back) = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .context("no reply stream from the buyer")?
        .context("reply streams ended")?;
    back.write_all(&[ACCEPT]).await?;
    back.flush().await?;
    let no_grant = denied_reason(&mut back).await?;

    let sk = ed25519_dalek::SigningKey::from_bytes(&secret);
    let me = market::PeerKey::of(&sk);
    let own = market::ImageGrant::sign(&sk, image, Some(me), 0, None);
    s.write_all(&frame(13, &market::encode_grant(&own))).await?;
    s.write_all(&frame(7, &0u32.to_le_bytes())).await?;
    s.flush().await?;
    let self_signed = denied_reason(&mut back).await?;
    driver.abort();
    Ok(Probe {
        raw_providers,
        raw_records,
        derived_providers,
        no_grant,
        self_signed,
    })
}

/// Reads one reply: the Denied reason byte, or 255 for any other message.
async fn denied_reason(s: &mut libp2p::Stream) -> Result<u8> {
    let read = async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).await?;
        anyhow::Ok(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("no reply in 10 s")??;
    if body.len() == 34 && body[0] == 14 {
        return Ok(body[33]);
    }
    if body.first() == Some(&8) {
        bail!("the buyer sent a chunk to a peer without a valid grant");
    }
    Ok(255)
}

async fn providers(swarm: &mut Swarm<Bare>, key: &[u8]) -> Result<HashSet<PeerId>> {
    let q = swarm
        .behaviour_mut()
        .kad
        .get_providers(kad::RecordKey::new(&key));
    let mut found = HashSet::new();
    let run = async {
        loop {
            if let SwarmEvent::Behaviour(BareEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(r),
                step,
                ..
            })) = swarm.select_next_some().await
            {
                if id != q {
                    continue;
                }
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                    found.extend(providers);
                }
                if step.last {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .context("provider lookup did not end in 30 s")?;
    Ok(found)
}

async fn records(swarm: &mut Swarm<Bare>, key: &[u8]) -> Result<usize> {
    let q = swarm
        .behaviour_mut()
        .kad
        .get_record(kad::RecordKey::new(&key));
    let mut found = 0;
    let run = async {
        loop {
            if let SwarmEvent::Behaviour(BareEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetRecord(r),
                step,
                ..
            })) = swarm.select_next_some().await
            {
                if id != q {
                    continue;
                }
                if let Ok(kad::GetRecordOk::FoundRecord(_)) = r {
                    found += 1;
                }
                if step.last {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .context("record lookup did not end in 30 s")?;
    Ok(found)
}
