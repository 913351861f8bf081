//! Property tests of the image grant decoder: random, truncated and bit-flipped
//! bytes never panic; a flipped grant never decodes as a different valid grant;
//! grants admit exactly the peer, image, owner and time they name.

use ed25519_dalek::SigningKey;
use market::*;
use proptest::prelude::*;

fn arb_grant() -> impl Strategy<Value = (u8, ImageGrant)> {
    (
        1u8..=255,
        any::<[u8; 32]>(),
        proptest::option::of(any::<[u8; 32]>().prop_map(PeerKey)),
        any::<u64>(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(k, image, peer, issued_ms, until_ms)| {
            (
                k,
                ImageGrant {
                    image,
                    peer,
                    issued_ms,
                    until_ms,
                },
            )
        })
}

proptest! {
    #[test]
    fn decode_grant_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = decode_grant(&bytes);
    }

    #[test]
    fn truncated_and_flipped_grants_are_refused(
        (k, body) in arb_grant(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let sk = SigningKey::from_bytes(&[k; 32]);
        let g = Signed::sign(&sk, body);
        let bytes = encode_grant(&g);
        prop_assert_eq!(decode_grant(&bytes).unwrap(), g.clone());
        // every strict prefix fails
        let n = cut.index(bytes.len());
        prop_assert!(decode_grant(&bytes[..n]).is_err());
        // one flipped bit anywhere: refused (signature, version or encoding), or,
        // where bincode ignores the bit (an Option tag's high bits are not), never
        // a grant other than the signed one
        let mut forged = bytes.clone();
        forged[flip.index(bytes.len())] ^= 1 << bit;
        if let Ok(d) = decode_grant(&forged) {
            prop_assert_eq!(d, g);
        }
    }

    #[test]
    fn admits_only_what_it_names(
        (k, body) in arb_grant(),
        other in any::<[u8; 32]>(),
        now in any::<u64>(),
    ) {
        let sk = SigningKey::from_bytes(&[k; 32]);
        let owner = PeerKey::of(&sk);
        let g = decode_grant(&encode_grant(&Signed::sign(&sk, body.clone()))).unwrap();
        let peer = body.peer.unwrap_or(PeerKey(other));
        let live = body.until_ms.is_none_or(|t| now <= t);
        prop_assert_eq!(g.admits(&body.image, &owner, &peer, now).is_ok(), live);
        prop_assert_eq!(g.live(now), live);
        if other != body.image {
            prop_assert_eq!(
                g.admits(&other, &owner, &peer, now),
                Err(GrantRefusal::OtherImage)
            );
        }
        if PeerKey(other) != owner {
            prop_assert_eq!(
                g.admits(&body.image, &PeerKey(other), &peer, now),
                Err(GrantRefusal::NotOwner)
            );
        }
        if let Some(p) = body.peer {
            if p.0 != other {
                prop_assert_eq!(
                    g.admits(&body.image, &owner, &PeerKey(other), now),
                    Err(GrantRefusal::OtherPeer)
                );
            }
        }
    }
}
