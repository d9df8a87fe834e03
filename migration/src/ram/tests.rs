use super::*;
use crate::stream::StreamReader;

const MIB: u64 = 1 << 20;

#[test]
fn bitmap_from_kvm_words() {
    // 130 pages: three words, the last with 2 valid bits.
    let len = 130 * PAGE;
    let words = [0b1011, 1 << 63, u64::MAX];
    let map = DirtyBitmap::from_words(0x10_0000, len, &words).unwrap();
    let gpas: Vec<u64> = map.iter().collect();
    assert_eq!(
        gpas,
        vec![
            0x10_0000,
            0x10_0000 + PAGE,
            0x10_0000 + 3 * PAGE,
            0x10_0000 + 127 * PAGE,
            0x10_0000 + 128 * PAGE,
            0x10_0000 + 129 * PAGE,
        ]
    );
    // Bits past page 129 were dropped.
    assert_eq!(map.count(), 6);
    assert!(map.is_set(0x10_0000 + 129 * PAGE + 5));
    assert!(!map.is_set(0x10_0000 + 130 * PAGE));
    assert!(!map.is_set(0));
    assert_eq!(map.start_gpa(), 0x10_0000);
    assert_eq!(map.len_bytes(), len);

    let e = DirtyBitmap::from_words(0, len, &words[..2]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "dirty log of 2 words for 130 pages at 0x0 (expected 3 words)"
    );
}

#[test]
fn bitmap_ranges_are_checked() {
    assert!(matches!(
        DirtyBitmap::new(0x800, PAGE),
        Err(RamError::Unaligned {
            what: "range start",
            ..
        })
    ));
    assert!(matches!(
        DirtyBitmap::new(0, 100),
        Err(RamError::Unaligned {
            what: "range length",
            ..
        })
    ));
    assert!(matches!(
        DirtyBitmap::new(u64::MAX - 0xfff, 2 * PAGE),
        Err(RamError::TooLarge { .. })
    ));
    let empty = DirtyBitmap::new(0, 0).unwrap();
    assert!(empty.is_clear());
    assert_eq!(empty.iter().count(), 0);
}

#[test]
fn bitmap_set_union_clear() {
    let mut a = DirtyBitmap::new(0, 4 * MIB).unwrap();
    let mut b = DirtyBitmap::new(0, 4 * MIB).unwrap();
    assert!(a.is_clear());
    a.set(0x1234).unwrap();
    b.set(0x3f_f000).unwrap();
    b.set(0x1000).unwrap();
    let e = a.set(4 * MIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        "gpa 0x400000 is outside the dirty bitmap (0x0, 1024 pages)"
    );
    a.union(&b).unwrap();
    assert_eq!(a.iter().collect::<Vec<_>>(), vec![0x1000, 0x3f_f000]);
    assert_eq!(a.count(), 2);
    let other = DirtyBitmap::new(PAGE, 4 * MIB).unwrap();
    assert!(matches!(
        a.union(&other),
        Err(RamError::RangeMismatch { .. })
    ));
    a.set_all();
    assert_eq!(a.count(), 1024);
    assert_eq!(a.iter().last(), Some(4 * MIB - PAGE));
    a.clear();
    assert!(a.is_clear());

    // A range not a multiple of 64 pages: set_all stops at its end.
    let mut c = DirtyBitmap::new(0x1_0000_0000, 3 * PAGE).unwrap();
    c.set_all();
    assert_eq!(
        c.iter().collect::<Vec<_>>(),
        vec![0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000]
    );
}

/// Two RAM ranges (below and above a hole) of a few pages each.
fn guest() -> (Vec<u8>, Vec<u8>) {
    let mut low = vec![0u8; 8 * PAGE_SIZE];
    let mut high = vec![0u8; 4 * PAGE_SIZE];
    for (i, b) in low.iter_mut().enumerate() {
        // Pages 0, 2, 4, 6 hold data; odd pages stay zero.
        if (i / PAGE_SIZE) % 2 == 0 {
            *b = (i % 251) as u8 + 1;
        }
    }
    high[PAGE_SIZE * 3 + 100] = 0xee;
    (low, high)
}

const HIGH: u64 = 0x1_0000_0000;

#[test]
fn send_and_apply_pages() {
    let (low, high) = guest();
    let src = RamSlices::new(vec![(HIGH, &high[..]), (0, &low[..])]).unwrap();
    let mut dirty_low = DirtyBitmap::new(0, low.len() as u64).unwrap();
    dirty_low.set_all();
    let mut dirty_high = DirtyBitmap::new(HIGH, high.len() as u64).unwrap();
    dirty_high.set_all();

    let mut out = StreamWriter::new(Vec::new()).unwrap();
    let sent = send_pages(&mut out, &src, dirty_low.iter().chain(dirty_high.iter())).unwrap();
    assert_eq!(
        sent,
        PageCounts {
            data_pages: 5,
            zero_pages: 7
        }
    );
    out.write(&Section::End).unwrap();
    let bytes = out.into_inner().unwrap();
    // Only the data pages carry 4 KiB: the zero pages are 8-byte markers.
    assert!(bytes.len() < 6 * PAGE_SIZE, "{}", bytes.len());

    // The destination starts with garbage everywhere: zero pages must be
    // written as zeroes, not skipped.
    let mut d_low = vec![0xaau8; low.len()];
    let mut d_high = vec![0xaau8; high.len()];
    {
        let mut dst =
            RamSlicesMut::new(vec![(0, &mut d_low[..]), (HIGH, &mut d_high[..])]).unwrap();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        let mut applied = PageCounts::default();
        loop {
            match r.read().unwrap() {
                Section::RamPages(p) => {
                    let c = apply_pages(&mut dst, &p).unwrap();
                    applied.data_pages += c.data_pages;
                    applied.zero_pages += c.zero_pages;
                }
                Section::End => break,
                s => panic!("unexpected {s:?}"),
            }
        }
        assert_eq!(applied, sent);
    }
    assert_eq!(d_low, low);
    assert_eq!(d_high, high);
}

#[test]
fn pages_are_batched() {
    let ram = vec![1u8; (PAGES_PER_SECTION + 3) * PAGE_SIZE];
    let src = RamSlices::new(vec![(0, &ram[..])]).unwrap();
    let mut map = DirtyBitmap::new(0, ram.len() as u64).unwrap();
    map.set_all();
    let mut out = StreamWriter::new(Vec::new()).unwrap();
    send_pages(&mut out, &src, map.iter()).unwrap();
    let bytes = out.into_inner().unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let sizes: Vec<usize> = std::iter::from_fn(|| match r.read() {
        Ok(Section::RamPages(p)) => Some(p.len()),
        _ => None,
    })
    .collect();
    assert_eq!(sizes, vec![PAGES_PER_SECTION, 3]);
    // Nothing to send: nothing written.
    let mut out = StreamWriter::new(Vec::new()).unwrap();
    send_pages(&mut out, &src, std::iter::empty()).unwrap();
    assert_eq!(out.bytes_written(), 16);
}

#[test]
fn source_errors() {
    let ram = vec![0u8; 2 * PAGE_SIZE];
    let src = RamSlices::new(vec![(0, &ram[..])]).unwrap();
    let mut out = StreamWriter::new(Vec::new()).unwrap();
    let e = send_pages(&mut out, &src, [0x10]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "page address 0x10 is not a multiple of 4 KiB"
    );
    let e = send_pages(&mut out, &src, [0x2000]).unwrap_err();
    assert_eq!(e.to_string(), "page at gpa 0x2000 is outside guest RAM");
}

#[test]
fn ram_layouts_are_checked() {
    let a = vec![0u8; 2 * PAGE_SIZE];
    let b = vec![0u8; PAGE_SIZE];
    let e = RamSlices::new(vec![(PAGE, &b[..]), (0, &a[..])])
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "RAM ranges at 0x0 and 0x1000 overlap");
    assert!(RamSlices::new(vec![(2 * PAGE, &b[..]), (0, &a[..])]).is_ok());
    let odd = [0u8; 100];
    assert!(matches!(
        RamSlices::new(vec![(0, &odd[..])]),
        Err(RamError::Unaligned {
            what: "range length",
            value: 100
        })
    ));
    let mut c = vec![0u8; PAGE_SIZE];
    assert!(matches!(
        RamSlicesMut::new(vec![(0x10, &mut c[..])]),
        Err(RamError::Unaligned {
            what: "range start",
            value: 0x10
        })
    ));
}

#[test]
fn a_page_outside_destination_ram_is_refused() {
    // A batch from a bigger source: the page at 0x3000 is past this RAM.
    let big = vec![3u8; 4 * PAGE_SIZE];
    let src = RamSlices::new(vec![(0, &big[..])]).unwrap();
    let mut out = StreamWriter::new(Vec::new()).unwrap();
    send_pages(&mut out, &src, [0x3000]).unwrap();
    let bytes = out.into_inner().unwrap();
    let Section::RamPages(pages) = StreamReader::new(&bytes[..]).unwrap().read().unwrap() else {
        panic!("not RamPages")
    };
    let mut small = vec![0u8; 3 * PAGE_SIZE];
    let mut dst = RamSlicesMut::new(vec![(0, &mut small[..])]).unwrap();
    let e = apply_pages(&mut dst, &pages).unwrap_err();
    assert_eq!(e.to_string(), "page at gpa 0x3000 is outside guest RAM");
    // In the hole between two ranges, and at the far end of the space.
    let mut lo = vec![0u8; PAGE_SIZE];
    let mut hi = vec![0u8; PAGE_SIZE];
    let mut dst = RamSlicesMut::new(vec![(0, &mut lo[..]), (HIGH, &mut hi[..])]).unwrap();
    for gpa in [PAGE, HIGH - PAGE, HIGH + PAGE, !0xfff] {
        assert!(matches!(
            dst.write_page(gpa, Page::Zero),
            Err(RamError::OutsideRam { gpa: g }) if g == gpa
        ));
    }
}

#[test]
fn zero_detection() {
    let mut page = [0u8; PAGE_SIZE];
    assert!(is_zero(&page));
    for i in [0, 63, 64, 2048, PAGE_SIZE - 1] {
        page[i] = 1;
        assert!(!is_zero(&page), "{i}");
        page[i] = 0;
    }
}

#[test]
fn rate_and_fits() {
    let mut rate = Rate::new();
    assert_eq!(rate.bytes_per_second(), None);
    assert_eq!(rate.time_for(1), None);
    assert!(!fits(1, &rate, Duration::from_secs(1)));
    assert!(fits(0, &rate, Duration::ZERO));

    // Rounds shorter than MIN_SAMPLE add up before they count.
    rate.record(1000, Duration::from_millis(4));
    assert_eq!(rate.bytes_per_second(), None);
    rate.record(1000, Duration::from_millis(6));
    assert_eq!(rate.bytes_per_second(), Some(200_000));

    // 100 MB/s: 3 MB take 30 ms.
    rate.record(100_000_000, Duration::from_secs(1));
    assert_eq!(rate.bytes_per_second(), Some(100_000_000));
    assert_eq!(rate.time_for(3_000_000), Some(Duration::from_millis(30)));
    assert!(fits(3_000_000, &rate, Duration::from_millis(30)));
    assert!(!fits(3_000_001, &rate, Duration::from_millis(30)));
    assert!(fits(u64::MAX, &rate, Duration::MAX));

    // The latest round replaces older ones; a stalled link never fits.
    rate.record(0, Duration::from_secs(1));
    assert_eq!(rate.bytes_per_second(), Some(0));
    assert_eq!(rate.time_for(1), None);
    assert!(!fits(1, &rate, Duration::from_secs(3600)));

    // Extremes do not overflow.
    rate.record(u64::MAX, Duration::MAX);
    assert!(rate.bytes_per_second().is_some());
    assert!(rate.time_for(u64::MAX).is_some());
}
