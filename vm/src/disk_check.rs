//! Is a disk something BIOS firmware can boot? Checked before a guest starts,
//! because SeaBIOS reports a failed boot only on its debug port: an empty,
//! random or truncated disk otherwise gives a blank console for ever.
//!
//! What is checked (reads the first two sectors and the file's size, nothing else):
//! - the disk is not empty;
//! - sector 0 ends in the boot signature 55 AA, or sector 1 holds a GPT header;
//! - no MBR partition and no GPT structure lies past the end of the file (a
//!   truncated copy boots its loader, which then cannot find its files).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

const SECTOR: u64 = 512;

/// Why a disk cannot boot, or `Ok` when firmware may boot it.
pub fn check_bootable(disk: &File) -> Result<()> {
    let size = disk
        .metadata()
        .map_err(|e| Error::io("reading the disk's size", e))?
        .len();
    let mut head = [0u8; 2 * SECTOR as usize];
    let got = read_prefix(disk, &mut head)?;
    check(&head[..got], size).map_err(|reason| Error::DiskNotBootable { reason })
}

fn read_prefix(f: &File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading the disk's first sectors", e)),
        }
    }
    Ok(n)
}

/// The check on the disk's first bytes (`head`, up to two sectors) and its size.
pub fn check(head: &[u8], size: u64) -> std::result::Result<(), String> {
    if size == 0 {
        return Err("the disk is empty (0 bytes)".into());
    }
    if size < SECTOR {
        return Err(format!(
            "the disk is {size} bytes, less than one 512-byte sector"
        ));
    }
    let sectors = size / SECTOR;
    let mbr_signed = head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA;
    let gpt = head.len() >= 1024 && &head[512..520] == b"EFI PART";
    if !mbr_signed && !gpt {
        return Err(
            "no boot signature (55 AA at byte 510) and no GPT header: not a bootable disk image \
             (an empty, random or damaged file?)"
                .into(),
        );
    }
    if mbr_signed {
        for i in 0..4 {
            let e = &head[446 + 16 * i..446 + 16 * (i + 1)];
            let kind = e[4];
            // 0xEE: GPT's protective entry, which may claim more than the disk.
            if kind == 0 || kind == 0xEE {
                continue;
            }
            let start = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")) as u64;
            let count = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) as u64;
            if start + count > sectors {
                return Err(truncated(
                    &format!("partition {} ends at sector {}", i + 1, start + count),
                    sectors,
                ));
            }
        }
    }
    if gpt {
        let h = &head[512..1024];
        let backup = u64::from_le_bytes(h[32..40].try_into().expect("8 bytes"));
        let last_usable = u64::from_le_bytes(h[48..56].try_into().expect("8 bytes"));
        if backup >= sectors || last_usable >= sectors {
            return Err(truncated(
                &format!("its GPT reaches sector {}", backup.max(last_usable)),
                sectors,
            ));
        }
    }
    Ok(())
}

fn truncated(what: &str, sectors: u64) -> String {
    format!(
        "the disk looks truncated: {what}, but the file has {sectors} sectors \
         (an incomplete copy or download?)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(parts: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; 1024];
        for (i, (kind, start, count)) in parts.iter().enumerate() {
            let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] = *kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&count.to_le_bytes());
        }
        s[510] = 0x55;
        s[511] = 0xAA;
        s
    }

    #[test]
    fn empty_short_and_unsigned_disks_are_refused() {
        assert!(check(&[], 0).unwrap_err().contains("empty"));
        assert!(check(&[0; 100], 100).unwrap_err().contains("less than one"));
        let zeros = vec![0u8; 1024];
        assert!(check(&zeros, 1 << 20)
            .unwrap_err()
            .contains("no boot signature"));
        let mut random = vec![0u8; 1024];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        random[510] = 0;
        assert!(check(&random, 1 << 20).is_err());
    }

    #[test]
    fn signed_disks_boot_unless_a_partition_runs_past_the_end() {
        // A boot sector alone (no partitions) is fine.
        check(&mbr(&[]), 512).unwrap();
        // One partition from sector 2048 over 1 MiB of a 2 MiB disk.
        let d = mbr(&[(0x83, 2048, 2048)]);
        check(&d, 2 << 20).unwrap();
        // The same table on a copy cut to 1.5 MiB.
        let e = check(&d, 3 << 19).unwrap_err();
        assert!(e.contains("truncated") && e.contains("partition 1"), "{e}");
        // A protective GPT entry claiming more than the disk is normal.
        let mut g = mbr(&[(0xEE, 1, u32::MAX)]);
        g[512..520].copy_from_slice(b"EFI PART");
        g[512 + 32..512 + 40].copy_from_slice(&4095u64.to_le_bytes());
        g[512 + 48..512 + 56].copy_from_slice(&4061u64.to_le_bytes());
        check(&g, 4096 * 512).unwrap();
        // The GPT's backup header past the end: truncated.
        let e = check(&g, 2048 * 512).unwrap_err();
        assert!(e.contains("GPT"), "{e}");
    }

    #[test]
    fn a_file_is_read_from_its_start_whatever_its_position() {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&mbr(&[(0x83, 1, 1)])).unwrap();
        f.seek(SeekFrom::Start(700)).unwrap();
        check_bootable(&f).unwrap();
        // The position is left alone.
        assert_eq!(f.stream_position().unwrap(), 700);
        f.set_len(0).unwrap();
        assert!(matches!(
            check_bootable(&f),
            Err(Error::DiskNotBootable { .. })
        ));
    }
}
