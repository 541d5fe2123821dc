"""Our tar member reader against webdataset's (tarfile-based) one, on archives from many writers."""

import bz2
import gzip
import io
import lzma
import os
import random
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from clipscale.wds.tar import iter_raw_samples, tar_members

rng = random.Random(0)


def payload(n):
    return bytes(rng.getrandbits(8) for _ in range(n))


FILES = [
    ("s0001.jpg", payload(0)),
    ("s0001.txt", b"a caption"),
    ("s0002.jpg", payload(511)),
    ("s0002.TXT", b"upper-case extension"),
    ("s0003.jpg", payload(512)),
    ("s0003.json", b'{"caption": "x"}'),
    ("s0004.seg.png", payload(513)),
    ("dir/sub/s0005.jpg", payload(5000)),
    ("noext", b"no extension"),
    ("__meta__", b"webdataset metadata"),
    ("__info__/x.txt", b"meta dir"),
    (".hidden", b"x"),
    ("p" * 60 + "/" + "q" * 80 + "/s0006.jpg", payload(700)),  # > 100 bytes: ustar prefix field
    ("café/s0007.txt", "é ü".encode()),  # non-ASCII name
]
LONG = [("d" * 120 + "/" + "e" * 200 + ".jpg", payload(10))]  # > 255 bytes: pax path or GNU long name


def write_tar(path, fmt, files, mode="w"):
    with tarfile.open(path, mode, format=fmt) as tf:
        adir = tarfile.TarInfo("adir")
        adir.type = tarfile.DIRTYPE
        tf.addfile(adir)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("s0001.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "s0001.jpg"
        tf.addfile(link)
        hard = tarfile.TarInfo("s0009.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "s0002.jpg"
        tf.addfile(hard)
    return path


def reference(path):
    with open(path, "rb") as f:
        return list(tar_file_iterator(f))


def ours(path):
    with open(path, "rb") as f:
        return list(tar_members(f))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_webdatasets_for_each_tar_format(tmp_path, fmt):
    files = FILES + (LONG if fmt != tarfile.USTAR_FORMAT else [])
    path = write_tar(tmp_path / "a.tar", fmt, files)
    got = ours(path)
    assert got == reference(path)
    names = [f["fname"] for f in got]
    assert "café/s0007.txt" in names and "dir/sub/s0005.jpg" in names and files[12][0] in names
    assert "__meta__" not in names and "__info__/x.txt" not in names and "adir" not in names
    if fmt != tarfile.USTAR_FORMAT:
        assert LONG[0][0] in names


def test_pax_headers_override_name_and_size_and_global_headers_apply(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        info = tarfile.TarInfo("k1.txt")
        info.size = 3
        info.pax_headers = {"path": "renamed/k1.txt", "comment": "per file"}
        tf.addfile(info, io.BytesIO(b"abc"))
        info = tarfile.TarInfo("k2.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"de"))
    assert (
        ours(path)
        == reference(path)
        == [{"fname": "renamed/k1.txt", "data": b"abc"}, {"fname": "k2.txt", "data": b"de"}]
    )


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_tars_are_read(tmp_path, compress):
    plain = write_tar(tmp_path / "a.tar", tarfile.PAX_FORMAT, FILES)
    packed = tmp_path / "a.tar.z"
    packed.write_bytes(compress(plain.read_bytes()))
    assert ours(packed) == reference(plain)


def test_webdataset_tarwriter_shards_and_pipes_give_the_same_samples(tmp_path):
    path = str(tmp_path / "wds.tar")
    with wds.TarWriter(path) as sink:
        for i in range(20):
            sink.write({"__key__": f"sample{i:04d}", "jpg": payload(100 + 37 * i), "txt": f"caption {i}"})
    direct = list(iter_raw_samples(path, pytest.fail))
    piped = list(iter_raw_samples(f"pipe:cat {path}", pytest.fail))
    assert [s["__key__"] for s in direct] == [f"sample{i:04d}" for i in range(20)]
    assert [s["txt"] for s in direct] == [f"caption {i}".encode() for i in range(20)]
    for s in piped:
        s["__url__"] = path
    assert piped == direct


def cut(path, n, out):
    out.write_bytes(path.read_bytes()[:n])
    return out


def first_files_then(path):
    """(files yielded, exception or None) of both readers."""
    results = []
    for read in (tar_members, tar_file_iterator):
        got, error = [], None
        with open(path, "rb") as f:
            try:
                for x in read(f):
                    got.append(x)
            except tarfile.ReadError as exn:
                error = exn
        results.append((got, error))
    return results


def test_truncated_member_raises_after_the_complete_ones(tmp_path):
    path = write_tar(tmp_path / "a.tar", tarfile.USTAR_FORMAT, FILES)
    (mine, my_error), (ref, ref_error) = first_files_then(cut(path, 512 * 9 + 200, tmp_path / "cut.tar"))
    assert mine == ref and len(mine) >= 2
    assert my_error is not None and ref_error is not None and "end of data" in str(my_error)


def test_cut_header_and_damaged_header_are_errors_where_tarfile_stops_quietly(tmp_path):
    path = write_tar(tmp_path / "a.tar", tarfile.USTAR_FORMAT, FILES)
    data = path.read_bytes()
    (mine, my_error), (ref, _) = first_files_then(cut(path, 512 * 4 + 100, tmp_path / "cut.tar"))
    assert mine == ref and len(mine) == 2 and "truncated header at byte 2048" in str(my_error)
    damaged = bytearray(data)
    damaged[512 * 4 + 10] ^= 0x55  # a name byte of the 4th header: its checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(damaged))
    (mine, my_error), (ref, _) = first_files_then(tmp_path / "bad.tar")
    assert mine == ref and len(mine) == 2 and "damaged header at byte 2048" in str(my_error)


def test_not_a_tar_and_empty_file_are_errors(tmp_path):
    (tmp_path / "junk.tar").write_bytes(os.urandom(3000))
    (tmp_path / "empty.tar").write_bytes(b"")
    for name, message in (("junk.tar", "not a tar file"), ("empty.tar", "empty file")):
        (mine, my_error), (ref, ref_error) = first_files_then(tmp_path / name)
        assert mine == ref == [] and message in str(my_error) and ref_error is not None


def test_iter_raw_samples_reports_a_truncated_shard_through_on_error(tmp_path):
    path = write_tar(tmp_path / "a.tar", tarfile.USTAR_FORMAT, FILES)
    errors = []
    samples = list(iter_raw_samples(str(cut(path, 512 * 13 + 200, tmp_path / "cut.tar")), errors.append))
    # s0003 is complete but unconfirmed (its key might continue in the cut member): lost, as with tarfile
    assert [s["__key__"] for s in samples] == ["s0001", "s0002"]
    assert len(errors) == 1 and isinstance(errors[0], tarfile.ReadError)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_samples_are_grouped_as_webdataset_groups_them(tmp_path, fmt):
    from webdataset.tariterators import group_by_keys

    from clipscale.wds.tar import group_samples

    path = write_tar(tmp_path / "a.tar", fmt, FILES + [("s0010.jpg", b"x"), ("s0010.json", b"{}")])
    members = ours(path)
    expected = list(group_by_keys([{**m, "__url__": "u"} for m in members]))
    got = list(group_samples(members, "u"))
    assert got == expected and len(got) >= 8
    assert any("txt" in s for s in got if s["__key__"] == "s0002")  # extensions are lower-cased
    with pytest.raises(ValueError, match="duplicate"):
        list(group_samples([{"fname": "a.txt", "data": b"1"}, {"fname": "a.txt", "data": b"2"}], "u"))


def test_a_failing_pipe_ends_the_shard_through_on_error(tmp_path):
    errors = []
    assert list(iter_raw_samples("pipe:exit 3", errors.append)) == []
    assert len(errors) == 1 and "status 3" in str(errors[0])
    errors.clear()
    path = write_tar(tmp_path / "a.tar", tarfile.USTAR_FORMAT, FILES)
    first = next(iter_raw_samples(f"pipe:cat {path}; exit 0", errors.append))  # closed early: no error
    assert first["__key__"] == "s0001" and errors == []


@pytest.mark.parametrize("command", ["sleep 97", "sleep 97; cat {path}", "head -c 700 {path}; sleep 97"])
def test_a_stream_that_stalls_is_abandoned_after_the_read_timeout(tmp_path, command):
    """Before any byte, or mid-member: the reader gives up after the timeout (the pipe command is
    stopped), whether tarfile sees the stall itself or wrapped in its own error."""
    import time

    import psutil

    from clipscale.wds.tar import StalledRead

    path = write_tar(tmp_path / "a.tar", tarfile.USTAR_FORMAT, FILES)
    errors = []
    started = time.monotonic()
    samples = list(iter_raw_samples("pipe:" + command.format(path=path), errors.append, read_timeout=0.5))
    assert time.monotonic() - started < 10
    assert len(errors) == 1 and isinstance(errors[0], StalledRead), errors
    assert len(samples) <= 1
    time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[-1:] == ["97"]]


@pytest.mark.parametrize("read_timeout", [None, 2.0])
def test_a_corrupt_pipe_whose_command_keeps_writing_is_an_error_not_a_hang(read_timeout):
    """`yes` is not a tar and never stops: the reader must not wait for it to exit, and stops it."""
    import time

    import psutil

    errors = []
    started = time.monotonic()
    assert list(iter_raw_samples("pipe:yes clipscale-not-a-tar", errors.append, read_timeout=read_timeout)) == []
    assert time.monotonic() - started < 15 and len(errors) == 1
    time.sleep(0.2)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "clipscale-not-a-tar" in (p.info["cmdline"] or [])]
    assert not leftovers


def test_a_slow_pipe_that_keeps_delivering_is_not_taken_for_a_stalled_one(tmp_path):
    """Bytes arriving more slowly than one read chunk per timeout are progress, not a stall."""
    path = write_tar(tmp_path / "a.tar", tarfile.USTAR_FORMAT, FILES)
    size = path.stat().st_size
    slow = f"pipe:for i in $(seq 0 512 {size}); do tail -c +$((i + 1)) {path} | head -c 512; sleep 0.2; done"
    errors = []
    samples = list(iter_raw_samples(slow, errors.append, read_timeout=1.0))
    assert errors == [] and len(samples) == len(list(iter_raw_samples(str(path), errors.append)))


# ------------------------------------------------------------------ stopping a pipe: SIGTERM, grace, SIGKILL

STOP_PIPE = """
import sys, time
from clipscale.job.preempt import ignore_signals
from clipscale.wds.tar import _PipeReader
if sys.argv[2] == "worker":
    ignore_signals(["SIGTERM", "SIGUSR1"])  # as a data worker does: its pipes must still stop on SIGTERM
pipe = _PipeReader(sys.argv[1])
assert pipe.read(1000)
started = time.monotonic()
pipe.close()
print(round(time.monotonic() - started, 2))
"""
POLITE = "trap 'echo term > {marker}; exit 0' TERM; yes | head -c 100000; sleep 30 & wait"
STUBBORN = "trap '' TERM; yes | head -c 100000; sleep 30 & wait; echo {marker}"


@pytest.mark.parametrize("where", ["reader", "worker"])
def test_a_pipe_closed_before_its_end_gets_sigterm_and_time_to_clean_up(tmp_path, where):
    import subprocess
    import sys

    marker = tmp_path / "got-term"
    command = POLITE.format(marker=marker)
    done = subprocess.run([sys.executable, "-c", STOP_PIPE, command, where], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "term\n"  # its TERM trap ran: SIGTERM came first, and could be caught
    assert float(done.stdout) < 1.5  # it stopped on SIGTERM; no need to wait out the grace period
    assert not _processes_with(str(marker))


def test_a_pipe_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    import subprocess
    import sys

    from clipscale.wds.tar import _PipeReader

    marker = f"stubborn-{tmp_path.name}"
    done = subprocess.run(
        [sys.executable, "-c", STOP_PIPE, STUBBORN.format(marker=marker), "reader"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert _PipeReader.TERM_GRACE_S <= float(done.stdout) < _PipeReader.TERM_GRACE_S + 2
    assert not _processes_with(marker)  # the shell and its sleep: SIGKILLed with their group


def _processes_with(text: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if text in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found
