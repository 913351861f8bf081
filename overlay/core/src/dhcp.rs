//! The buyer's DHCP server: answers each guest's DISCOVER/REQUEST with the address
//! fixed in its lease, plus netmask, router, DNS, lease time and interface MTU.
//!
//! The DHCP message itself is decoded and encoded by `dhcproto`; this module keeps the
//! server's decisions (what to answer, where to send it) and the Ethernet/IPv4/UDP
//! framing around the message.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{self, DhcpOption, Flags, HType, Message, Opcode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::checksum;
use crate::eth::{ethertype, ETHERTYPE_IPV4, ETH_HDR};
use crate::{Error, MacAddr};

const BOOTP_FIXED: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Replies are padded to the classic minimum BOOTP size.
const BOOTP_MIN: usize = 300;

/// DHCP message types (option 53).
pub const DISCOVER: u8 = 1;
/// DHCPOFFER.
pub const OFFER: u8 = 2;
/// DHCPREQUEST.
pub const REQUEST: u8 = 3;
/// DHCPDECLINE.
pub const DECLINE: u8 = 4;
/// DHCPACK.
pub const ACK: u8 = 5;
/// DHCPNAK.
pub const NAK: u8 = 6;
/// DHCPRELEASE.
pub const RELEASE: u8 = 7;

/// A client message, as far as the server needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMessage {
    /// Transaction id.
    pub xid: u32,
    /// BOOTP flags (bit 15: reply by broadcast).
    pub flags: u16,
    /// Client's current address (renewing), or 0.0.0.0.
    pub ciaddr: Ipv4Addr,
    /// Client hardware address.
    pub chaddr: MacAddr,
    /// Option 53.
    pub msg_type: u8,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
}

fn malformed(detail: &'static str) -> Error {
    Error::Malformed {
        what: "DHCP packet",
        detail,
    }
}

/// Whether an Ethernet frame is IPv4/UDP to port 67 (a DHCP client message). Cheap;
/// used by the switch to divert these to the server.
pub fn is_dhcp_to_server(frame: &[u8]) -> bool {
    if frame.len() < ETH_HDR + 20 + 8 || ethertype(frame) != ETHERTYPE_IPV4 {
        return false;
    }
    let ip = &frame[ETH_HDR..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff; // MF or offset
    ip[0] >> 4 == 4
        && ip[9] == 17
        && frag == 0
        && ihl >= 20
        && ip.len() >= ihl + 8
        && u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]) == 67
}

/// Parses a DHCP client message from a whole Ethernet frame.
pub fn parse_client_frame(frame: &[u8]) -> Result<ClientMessage, Error> {
    if !is_dhcp_to_server(frame) {
        return Err(malformed("not IPv4/UDP to port 67"));
    }
    let ip = &frame[ETH_HDR..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total < ihl + 8 || total > ip.len() {
        return Err(malformed("IPv4 total length"));
    }
    let udp = &ip[ihl..total];
    let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if ulen < 8 || ulen > udp.len() {
        return Err(malformed("UDP length"));
    }
    parse_bootp(&udp[8..ulen])
}

/// Decodes a BOOTP/DHCP message with `dhcproto`, after checking the fixed part is
/// all there and the magic cookie is right (dhcproto reads but does not check it).
fn decode(b: &[u8]) -> Result<Message, Error> {
    if b.len() < BOOTP_FIXED + 4 {
        return Err(Error::Truncated {
            what: "DHCP packet",
            len: b.len(),
            need: BOOTP_FIXED + 4,
        });
    }
    if b[BOOTP_FIXED..BOOTP_FIXED + 4] != MAGIC {
        return Err(malformed("missing DHCP magic cookie"));
    }
    Message::decode(&mut Decoder::new(b)).map_err(|_| malformed("undecodable DHCP message"))
}

/// Parses the BOOTP/DHCP payload of a client message.
pub fn parse_bootp(b: &[u8]) -> Result<ClientMessage, Error> {
    let m = decode(b)?;
    if m.opcode() != Opcode::BootRequest {
        return Err(malformed("not a BOOTREQUEST"));
    }
    if m.htype() != HType::Eth || m.hlen() != 6 {
        return Err(malformed("hardware type is not Ethernet"));
    }
    let opts = m.opts();
    let msg_type = match opts.msg_type() {
        Some(t) => u8::from(t),
        None => return Err(malformed("no message type (plain BOOTP is not served)")),
    };
    if msg_type == 0 {
        return Err(malformed("no message type (plain BOOTP is not served)"));
    }
    let ip_opt = |code| match opts.get(code) {
        Some(DhcpOption::RequestedIpAddress(a)) | Some(DhcpOption::ServerIdentifier(a)) => Some(*a),
        _ => None,
    };
    Ok(ClientMessage {
        xid: m.xid(),
        flags: u16::from(m.flags()),
        ciaddr: m.ciaddr(),
        chaddr: MacAddr(m.chaddr().try_into().expect("hlen checked: 6 bytes")),
        msg_type,
        requested_ip: ip_opt(v4::OptionCode::RequestedIpAddress),
        server_id: ip_opt(v4::OptionCode::ServerIdentifier),
    })
}

/// Server settings (from the buyer's config).
#[derive(Clone, Debug)]
pub struct DhcpServer {
    /// Source MAC of replies (the buyer host's).
    pub server_mac: MacAddr,
    /// Server identifier, router and source IP of replies.
    pub server_ip: Ipv4Addr,
    /// Subnet mask.
    pub netmask: Ipv4Addr,
    /// DNS server.
    pub dns: Ipv4Addr,
    /// Interface MTU (option 26).
    pub mtu: u16,
    /// Lease time.
    pub lease_time: Duration,
}

impl DhcpServer {
    /// Answers `msg` from the guest whose leased address is `guest_ip`: writes the
    /// reply frame into `out` (cleared first) and returns its message type, or `None`
    /// when no reply is due (another server chosen, release, decline, unknown type).
    pub fn answer(&self, msg: &ClientMessage, guest_ip: Ipv4Addr, out: &mut Vec<u8>) -> Option<u8> {
        let reply = match msg.msg_type {
            DISCOVER => OFFER,
            REQUEST => {
                if msg.server_id.is_some_and(|s| s != self.server_ip) {
                    return None; // the client picked another server
                }
                let wanted = msg
                    .requested_ip
                    .or((!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr));
                if wanted.is_none_or(|w| w == guest_ip) {
                    ACK
                } else {
                    NAK
                }
            }
            _ => return None,
        };
        self.build(msg, reply, guest_ip, out);
        Some(reply)
    }

    fn build(&self, msg: &ClientMessage, reply: u8, guest_ip: Ipv4Addr, out: &mut Vec<u8>) {
        let yiaddr = if reply == NAK {
            Ipv4Addr::UNSPECIFIED
        } else {
            guest_ip
        };
        // RFC 2131 4.1: where the reply goes.
        let broadcast = reply == NAK || (msg.ciaddr.is_unspecified() && msg.flags & 0x8000 != 0);
        let (dst_mac, dst_ip) = if broadcast {
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST)
        } else if !msg.ciaddr.is_unspecified() {
            (msg.chaddr, msg.ciaddr)
        } else {
            (msg.chaddr, yiaddr)
        };

        let mut m = Message::new_with_id(
            msg.xid,
            msg.ciaddr,
            yiaddr,
            self.server_ip, // siaddr
            Ipv4Addr::UNSPECIFIED,
            &msg.chaddr.0,
        );
        m.set_opcode(Opcode::BootReply)
            .set_flags(Flags::new(msg.flags));
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(reply.into()));
        o.insert(DhcpOption::ServerIdentifier(self.server_ip));
        if reply != NAK {
            let secs = self.lease_time.as_secs().min(u32::MAX as u64) as u32;
            o.insert(DhcpOption::AddressLeaseTime(secs));
            o.insert(DhcpOption::Renewal(secs / 2));
            o.insert(DhcpOption::Rebinding(secs / 8 * 7));
            o.insert(DhcpOption::SubnetMask(self.netmask));
            o.insert(DhcpOption::Router(vec![self.server_ip]));
            o.insert(DhcpOption::DomainNameServer(vec![self.dns]));
            o.insert(DhcpOption::InterfaceMtu(self.mtu));
            let bcast = u32::from(guest_ip) | !u32::from(self.netmask);
            o.insert(DhcpOption::BroadcastAddr(Ipv4Addr::from(bcast)));
        }
        let mut bootp = Vec::with_capacity(BOOTP_MIN);
        m.encode(&mut Encoder::new(&mut bootp))
            .expect("a reply of fixed options always encodes");
        if bootp.len() < BOOTP_MIN {
            bootp.resize(BOOTP_MIN, 0);
        }

        out.clear();
        out.extend_from_slice(&dst_mac.0);
        out.extend_from_slice(&self.server_mac.0);
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip_start = out.len();
        let total = (20 + 8 + bootp.len()) as u16;
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // id, DF, ttl, UDP
        out.extend_from_slice(&self.server_ip.octets());
        out.extend_from_slice(&dst_ip.octets());
        let c = checksum::ipv4_header(&out[ip_start..ip_start + 20]);
        out[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        let udp_start = out.len();
        let ulen = (8 + bootp.len()) as u16;
        out.extend_from_slice(&67u16.to_be_bytes());
        out.extend_from_slice(&68u16.to_be_bytes());
        out.extend_from_slice(&ulen.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&bootp);
        let uc = checksum::udp_v4(self.server_ip, dst_ip, &out[udp_start..]);
        out[udp_start + 6..udp_start + 8].copy_from_slice(&uc.to_be_bytes());
    }
}

/// A reply parsed back (tests and fuzzing check what the server sends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerReply {
    /// Option 53.
    pub msg_type: u8,
    /// Transaction id.
    pub xid: u32,
    /// Offered address.
    pub yiaddr: Ipv4Addr,
    /// Options by code, each as its raw value bytes.
    pub options: BTreeMap<u8, Vec<u8>>,
    /// Destination MAC of the frame.
    pub dst_mac: MacAddr,
    /// Destination IP.
    pub dst_ip: Ipv4Addr,
}

/// Parses a server reply frame (as a client such as udhcpc would).
pub fn parse_server_frame(frame: &[u8]) -> Result<ServerReply, Error> {
    if frame.len() < ETH_HDR + 28 + BOOTP_FIXED + 4 || ethertype(frame) != ETHERTYPE_IPV4 {
        return Err(malformed("too short for a DHCP reply"));
    }
    let ip = &frame[ETH_HDR..];
    if checksum::checksum(&ip[..20]) != 0 {
        return Err(malformed("bad IPv4 checksum"));
    }
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let udp = &ip[20..];
    let sum = checksum::csum_add(checksum::pseudo_v4(src_ip, dst_ip, 17, udp.len()), udp);
    if checksum::csum_fold(sum) != 0 {
        return Err(malformed("bad UDP checksum"));
    }
    let m = decode(&udp[8..])?;
    // Each option back as code -> value bytes, as dhcproto encodes it.
    let mut options = BTreeMap::new();
    for opt in m.opts().iter().map(|(_, o)| o) {
        let mut raw = Vec::new();
        opt.encode(&mut Encoder::new(&mut raw))
            .map_err(|_| malformed("option does not re-encode"))?;
        if raw.len() >= 2 {
            options.insert(raw[0], raw[2..].to_vec());
        }
    }
    Ok(ServerReply {
        msg_type: m.opts().msg_type().map(u8::from).unwrap_or(0),
        xid: m.xid(),
        yiaddr: m.yiaddr(),
        options,
        dst_mac: MacAddr(frame[..6].try_into().expect("6")),
        dst_ip,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::*;
    use proptest::prelude::*;

    /// A client message frame like busybox udhcpc sends (it includes options 57, 61,
    /// 12, 55 and sends from 0.0.0.0 to the broadcast address).
    pub(crate) fn client_frame(
        mac: MacAddr,
        ty: u8,
        xid: u32,
        requested: Option<Ipv4Addr>,
        server: Option<Ipv4Addr>,
        ciaddr: Ipv4Addr,
    ) -> Vec<u8> {
        let mut b = vec![0u8; BOOTP_FIXED];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&xid.to_be_bytes());
        b[12..16].copy_from_slice(&ciaddr.octets());
        b[28..34].copy_from_slice(&mac.0);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[53, 1, ty]);
        b.extend_from_slice(&[57, 2, 0x02, 0x40]); // max message size 576
        b.extend_from_slice(&[61, 7, 1]);
        b.extend_from_slice(&mac.0);
        if let Some(r) = requested {
            b.extend_from_slice(&[50, 4]);
            b.extend_from_slice(&r.octets());
        }
        if let Some(s) = server {
            b.extend_from_slice(&[54, 4]);
            b.extend_from_slice(&s.octets());
        }
        b.extend_from_slice(&[12, 5]);
        b.extend_from_slice(b"guest");
        b.extend_from_slice(&[55, 7, 1, 3, 6, 12, 15, 28, 42]);
        b.push(255);
        b.resize(300, 0);
        let (src, dst) = if ciaddr.is_unspecified() {
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST)
        } else {
            (ciaddr, BUYER_IP)
        };
        udp4(mac, MacAddr::BROADCAST, src, dst, 68, 67, &b)
    }

    pub(crate) fn server() -> DhcpServer {
        DhcpServer {
            server_mac: BUYER_MAC,
            server_ip: BUYER_IP,
            netmask: Ipv4Addr::new(255, 255, 0, 0),
            dns: BUYER_IP,
            mtu: 1400,
            lease_time: Duration::from_secs(3600),
        }
    }

    #[test]
    fn full_exchange_like_udhcpc() {
        let s = server();
        let z = Ipv4Addr::UNSPECIFIED;
        let mut out = Vec::new();
        // DISCOVER -> OFFER
        let d =
            parse_client_frame(&client_frame(GUEST_MAC, DISCOVER, 0x1234, None, None, z)).unwrap();
        assert_eq!(s.answer(&d, GUEST_IP, &mut out), Some(OFFER));
        let offer = parse_server_frame(&out).unwrap();
        assert_eq!(
            (offer.msg_type, offer.xid, offer.yiaddr),
            (OFFER, 0x1234, GUEST_IP)
        );
        assert_eq!(offer.dst_mac, GUEST_MAC);
        assert_eq!(offer.options[&1], vec![255, 255, 0, 0]);
        assert_eq!(offer.options[&3], BUYER_IP.octets().to_vec());
        assert_eq!(offer.options[&6], BUYER_IP.octets().to_vec());
        assert_eq!(offer.options[&54], BUYER_IP.octets().to_vec());
        assert_eq!(offer.options[&26], 1400u16.to_be_bytes().to_vec());
        assert_eq!(offer.options[&51], 3600u32.to_be_bytes().to_vec());
        // REQUEST (selecting) -> ACK
        let r = parse_client_frame(&client_frame(
            GUEST_MAC,
            REQUEST,
            0x1235,
            Some(GUEST_IP),
            Some(BUYER_IP),
            z,
        ))
        .unwrap();
        assert_eq!(s.answer(&r, GUEST_IP, &mut out), Some(ACK));
        let ack = parse_server_frame(&out).unwrap();
        assert_eq!((ack.msg_type, ack.yiaddr), (ACK, GUEST_IP));
        // Renewal: unicast from the leased address -> ACK to ciaddr.
        let r =
            parse_client_frame(&client_frame(GUEST_MAC, REQUEST, 7, None, None, GUEST_IP)).unwrap();
        assert_eq!(s.answer(&r, GUEST_IP, &mut out), Some(ACK));
        assert_eq!(parse_server_frame(&out).unwrap().dst_ip, GUEST_IP);
        // Asking for another address -> NAK, broadcast.
        let r = parse_client_frame(&client_frame(
            GUEST_MAC,
            REQUEST,
            8,
            Some(Ipv4Addr::new(10, 77, 9, 9)),
            None,
            z,
        ))
        .unwrap();
        assert_eq!(s.answer(&r, GUEST_IP, &mut out), Some(NAK));
        let nak = parse_server_frame(&out).unwrap();
        assert_eq!(
            (nak.dst_mac, nak.dst_ip, nak.yiaddr),
            (MacAddr::BROADCAST, Ipv4Addr::BROADCAST, z)
        );
        // Another server selected -> silence.
        let r = parse_client_frame(&client_frame(
            GUEST_MAC,
            REQUEST,
            9,
            Some(GUEST_IP),
            Some(Ipv4Addr::new(1, 2, 3, 4)),
            z,
        ))
        .unwrap();
        assert_eq!(s.answer(&r, GUEST_IP, &mut out), None);
        let r =
            parse_client_frame(&client_frame(GUEST_MAC, RELEASE, 9, None, None, GUEST_IP)).unwrap();
        assert_eq!(s.answer(&r, GUEST_IP, &mut out), None);
    }

    #[test]
    fn mtu_fits_a_1500_byte_path() {
        let mtu = server().mtu as usize;
        // outer IPv4 + UDP + overlay header + guest Ethernet frame + tag
        assert!(20 + 8 + crate::wire::DATA_HEADER_LEN + 14 + mtu + crate::wire::TAG_LEN <= 1500);
        assert!(
            40 + 8 + crate::OVERLAY_OVERHEAD + 14 + mtu <= 1500,
            "also over an IPv6 underlay"
        );
        assert_eq!(crate::guest_mtu_for_path(1500, false), 1426);
    }

    #[test]
    fn rejects_malformed() {
        let z = Ipv4Addr::UNSPECIFIED;
        let good = client_frame(GUEST_MAC, DISCOVER, 1, None, None, z);
        assert!(parse_client_frame(&good[..good.len() - 100]).is_err());
        let mut no_magic = good.clone();
        no_magic[14 + 28 + BOOTP_FIXED] = 0;
        assert!(parse_client_frame(&no_magic).is_err());
        let mut reply_op = good.clone();
        reply_op[14 + 28] = 2;
        assert!(parse_client_frame(&reply_op).is_err());
        assert!(parse_client_frame(&udp4(
            GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 68, 53, b"x"
        ))
        .is_err());
    }

    proptest! {
        #[test]
        fn parser_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_bootp(&b);
            let _ = parse_client_frame(&b);
        }

        #[test]
        fn options_in_any_order(xid in any::<u32>(), pad in 0usize..20, extra in proptest::collection::vec((prop_oneof![Just(55u8), Just(61u8), 224u8..=254], proptest::collection::vec(any::<u8>(), 1..20)), 0..6)) {
            let mut b = vec![0u8; BOOTP_FIXED];
            b[0] = 1; b[1] = 1; b[2] = 6;
            b[4..8].copy_from_slice(&xid.to_be_bytes());
            b[28..34].copy_from_slice(&GUEST_MAC.0);
            b.extend_from_slice(&MAGIC);
            for (code, data) in &extra {
                b.push(*code); b.push(data.len() as u8); b.extend_from_slice(data);
            }
            b.extend(std::iter::repeat_n(0u8, pad));
            b.extend_from_slice(&[53, 1, DISCOVER, 255]);
            let m = parse_bootp(&b).unwrap();
            prop_assert_eq!((m.xid, m.chaddr, m.msg_type), (xid, GUEST_MAC, DISCOVER));
            let mut out = Vec::new();
            prop_assert_eq!(server().answer(&m, GUEST_IP, &mut out), Some(OFFER));
            prop_assert_eq!(parse_server_frame(&out).unwrap().yiaddr, GUEST_IP);
        }
    }
}
