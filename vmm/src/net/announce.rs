//! What a copy that just went live tells the network, so that switches and neighbours send the
//! guest's traffic to its new host at once: a RARP announcement of the guest's MAC (what QEMU's
//! announce-self sends) and a gratuitous ARP for each IPv4 address the guest was seen using,
//! several times, at growing intervals (50, 150, 250, 350, 450 ms after go-live, as QEMU's
//! default schedule).

use super::spec::Mac;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Delay before each round.
pub const SCHEDULE: [Duration; 5] = [
    Duration::from_millis(0),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(100),
    Duration::from_millis(100),
];

const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_ARP: u16 = 0x0806;
const ETH_RARP: u16 = 0x8035;
const ETH_IPV4: u16 = 0x0800;
/// Shortest Ethernet frame without its FCS.
const MIN_FRAME: usize = 60;

fn arp_like(ethertype: u16, op: u16, mac: Mac, ip: Ipv4Addr, target_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&ETH_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&ip.octets());
    f.resize(MIN_FRAME, 0);
    f
}

/// RARP "reverse request" naming `mac` as sender and target (QEMU's announcement).
pub fn rarp(mac: Mac) -> Vec<u8> {
    arp_like(ETH_RARP, 3, mac, Ipv4Addr::UNSPECIFIED, mac.0)
}

/// Gratuitous ARP request: `ip` is at `mac`.
pub fn gratuitous_arp(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    arp_like(ETH_ARP, 1, mac, ip, [0; 6])
}

/// The sender address of an ARP packet the guest sent from `mac` (how the device learns the
/// addresses to announce), if `frame` is one.
pub fn arp_sender(frame: &[u8], mac: Mac) -> Option<Ipv4Addr> {
    if frame.len() < 42 || frame[6..12] != mac.0 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_ARP {
        return None;
    }
    let arp = &frame[14..];
    if arp[0..2] != [0, 1] || arp[2..4] != ETH_IPV4.to_be_bytes() || arp[4] != 6 || arp[5] != 4 || arp[8..14] != mac.0 {
        return None;
    }
    let ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_well_formed_and_the_guests_arp_is_learned() {
        let mac = Mac([0x52, 0x54, 0, 1, 2, 3]);
        let r = rarp(mac);
        assert_eq!(r.len(), MIN_FRAME);
        assert_eq!(&r[..6], &BROADCAST);
        assert_eq!(&r[12..14], &[0x80, 0x35]);
        assert_eq!(&r[20..22], &[0, 3]);
        let ip = Ipv4Addr::new(192, 0, 2, 2);
        let g = gratuitous_arp(mac, ip);
        assert_eq!(&g[12..14], &[0x08, 0x06]);
        assert_eq!(&g[28..32], &ip.octets());
        assert_eq!(&g[38..42], &ip.octets());
        assert_eq!(arp_sender(&g, mac), Some(ip), "a guest's own ARP teaches its address");
        assert_eq!(arp_sender(&g, Mac([0x52, 0x54, 0, 9, 9, 9])), None, "not from this NIC");
        assert_eq!(arp_sender(&r, mac), None, "RARP is not ARP");
        assert_eq!(arp_sender(&g[..30], mac), None, "short frames are ignored");
    }
}
