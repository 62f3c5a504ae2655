import re

from kh.hw.console import ConsoleLog


def test_lines_stamped_partial_kept_and_rotated(tmp_path):
    p = tmp_path / "node1.log"
    log = ConsoleLog(p, max_bytes=200, keep=2)
    log.write(b"U-Boot 2023.01\r\n=> ")
    text = p.read_text()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z U-Boot 2023.01\n", text)
    log.write(b"printenv\r\n")
    assert p.read_text().endswith(" => printenv\n")
    for i in range(20):
        log.write(b"line %d\n" % i)
    log.close()
    assert (tmp_path / "node1.log.1").exists()
    assert p.stat().st_size <= 200 + 40
    assert "line 19" in p.read_text()
