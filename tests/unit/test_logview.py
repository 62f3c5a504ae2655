"""`kh logs`: a principal's escape sequences never reach the operator's terminal, and -f
follows the log across rotation."""

import threading

from kh.hw.console import ConsoleLog
from kh.logview import follow, safe_text, terminal_writer


def test_controls_are_shown_not_obeyed():
    hostile = "title\x1b]0;pwned\x07 clear\x1b[2J\x1b[H bell\x07 cr\rdel\x7f c1\x9b31m"
    shown = safe_text(hostile)
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in shown.replace("\n", ""))
    assert shown == ("title^[]0;pwned^G clear^[[2J^[[H bell^G cr^Mdel^? c1M-^[31m")
    assert safe_text("tab\tand newline\nstay, é ü 漢 too") == "tab\tand newline\nstay, é ü 漢 too"


def test_a_character_split_between_chunks_stays_whole():
    got: list[str] = []
    sink = terminal_writer(got.append)
    data = "é漢\x1b[1m".encode()
    for i in range(len(data)):
        sink(data[i:i + 1])
    assert "".join(got) == "é漢^[[1m"
    sink(b"\xff\n")
    assert "".join(got).endswith("\ufffd\n")


def test_follow_reads_on_across_rotation(tmp_path):
    path = tmp_path / "node1.log"
    log = ConsoleLog(path, max_bytes=300, keep=2)
    log.write(b"first\n")
    seen = bytearray()
    done = threading.Event()
    t = threading.Thread(target=follow, args=(path, seen.extend),
                         kwargs={"follow": True, "poll": 0.01, "stop": done.is_set})
    t.start()
    def seen_soon(word: bytes) -> bool:
        for _ in range(500):
            if word in seen:
                return True
            threading.Event().wait(0.01)
        return False

    try:
        # Several rotations while following, each seen before the next (as with real sizes;
        # like tail -F, a follower cannot see a file rotated away twice between two looks).
        for i in range(40):
            log.write(b"line %d\n" % i)
            assert seen_soon(b"line %d\n" % i), seen.decode()
        log.write(b"last\n")
        log.close()
        assert seen_soon(b"last")
    finally:
        done.set()
        t.join(5)
    text = seen.decode()
    assert (tmp_path / "node1.log.1").exists(), "the log rotated"
    for word in ["first", *(f"line {i}" for i in range(40)), "last"]:
        assert word in text, (word, text)


def test_without_follow_it_reads_to_the_end_and_returns(tmp_path):
    path = tmp_path / "n.log"
    path.write_bytes(b"a\nb\n")
    seen = bytearray()
    follow(path, seen.extend, follow=False)
    assert bytes(seen) == b"a\nb\n"
