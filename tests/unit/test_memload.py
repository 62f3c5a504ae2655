from kh.hw import memload


def test_packets_cover_data_with_checksums():
    data = bytes(range(256)) * 20  # 5120 bytes: three packets
    load = memload.build(0x8000000, data)
    assert len(load.packets) == 3 and load.size == 5120
    got = bytearray()
    addr = 0x8000000
    for p in load.packets:
        assert p[:1] == b"$" and p[-3:-2] == b"#"
        body = p[1:-3]
        assert int(p[-2:], 16) == sum(body) & 0xFF
        head, hexdata = body.split(b":", 1)
        a, n = head[1:].split(b",")
        assert int(a, 16) == addr and int(n, 16) * 2 == len(hexdata)
        assert len(p) <= 0x1000
        got += bytes.fromhex(hexdata.decode())
        addr += int(n, 16)
    assert bytes(got) == data
