#!/usr/bin/env python3
"""Hostile-input probe: runs fer-cam on bad files, options, streams and signals, and checks
that each case ends without a panic, abort or hang, that a failure is one `error:` line with
exit status 1, and that nothing outside the outputs named on the command line is created,
changed or deleted. Standard library only.

    cargo build --release && scripts/probe.py [target/release/fer-cam]

Prints one line per case and a tally; exits 1 if any case misbehaved.
"""
import gzip
import hashlib
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/fer-cam")
ROOT = tempfile.mkdtemp(prefix="fer-cam-probe-")
os.chdir(ROOT)
ENV = dict(os.environ, FER_CAM_CACHE=os.path.join(ROOT, "cache"))


def png(path, w, h, pixels=None, declared=None):
    """A gray 8-bit PNG; `declared` overrides the header's size (a decompression bomb)."""
    dw, dh = declared or (w, h)
    raw = b"".join(b"\0" + bytes((pixels or (lambda x, y: (x * 7 + y * 3) % 256))(x, y)
                                 for x in range(w)) for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", dw, dh, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    open(path, "wb").write(data)


def y4m(w=64, h=48, frames=3, header=None, colour="C420jpeg"):
    hdr = header or f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 {colour}\n".encode()
    size = w * h + 2 * ((w + 1) // 2) * ((h + 1) // 2)
    return hdr + b"".join(b"FRAME\n" + bytes((i * 13 + k) % 256 for k in range(size))
                          for i in range(frames))


def csv_rows(rows):
    return ("emotion,pixels,Usage\n" + "".join(
        f"{e},{' '.join(str((i * 31 + k) % 256) for k in range(2304))},{u}\n"
        for i, (e, u) in enumerate(rows))).encode()


def snapshot():
    out = {}
    for d, dirs, files in os.walk(ROOT):
        if os.path.relpath(d, ROOT).split(os.sep)[0] in ("cache", "fifo"):
            continue
        for n in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, ROOT)
            try:
                st = os.lstat(p)
                digest = hashlib.sha1(open(p, "rb").read()).hexdigest() if os.path.isfile(p) \
                    and not os.path.islink(p) and st.st_size < 50_000_000 else st.st_size
            except OSError:
                digest = "?"
            out[rel] = (st.st_mode, digest)
    return out


results = []


def report(name, ok, why=""):
    results.append((name, ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + why if why else ''}", flush=True)


def case(name, args, stdin=None, timeout=60, outputs=(), want=None):
    """Runs `fer-cam ARGS`; `outputs` may change; `want` is 0, 1 or None (either)."""
    before = snapshot()
    try:
        p = subprocess.run([BIN] + args, input=stdin, capture_output=True, timeout=timeout,
                           env=ENV, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return report(name, False, f"hang (> {timeout} s)")
    err = p.stderr.decode(errors="replace")
    why = []
    if "panicked" in err or p.returncode not in (0, 1):
        why.append(f"exit {p.returncode}: {err.strip()[-300:]}")
    if p.returncode == 1:
        errors = [l for l in err.splitlines() if l.startswith("error:")]
        if len(errors) != 1:
            why.append(f"{len(errors)} error lines: {err.strip()[-300:]!r}")
    if want is not None and p.returncode != want:
        why.append(f"exit {p.returncode}, wanted {want}: {err.strip()[-200:]}")
    after = snapshot()
    allowed = tuple(os.path.normpath(o) for o in outputs)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not any(k == a or k.startswith(a + os.sep) for a in allowed))
    if changed:
        why.append(f"touched {changed[:5]}")
    report(name, not why, "; ".join(why))
    return p


def signal_case(name, args, delay=2.0, stdin_pipe=False, limit=1.0):
    """Starts `fer-cam ARGS`, sends SIGTERM after `delay` s: it must exit 0 within `limit` s."""
    p = subprocess.Popen([BIN] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                         stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL)
    time.sleep(delay)
    t = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=10)  # stdin stays open: the source is still silent when the signal lands
    except subprocess.TimeoutExpired:
        p.kill()
        return report(name, False, "still running 10 s after SIGTERM")
    took = time.time() - t
    out, err = p.communicate()
    ok = took <= limit and p.returncode == 0 and b'"type":"summary"' in out
    report(name, ok, f"exit {p.returncode} {took:.2f} s after SIGTERM" + ("" if ok else
                                                                          f" {err[-200:]!r}"))


# ---- fixtures ----
os.makedirs("in/stills")
model = "in/model"
subprocess.run([BIN, "init", "--out", model, "--stem", "conv7x7_pool"], check=True,
               capture_output=True, env=ENV)
open("in/clip.y4m", "wb").write(y4m(frames=4))
png("in/stills/a.png", 64, 64)
open("in/empty", "wb").close()
rows = [(i % 7, ["Training", "PublicTest", "PrivateTest"][i % 3]) for i in range(30)]
open("in/ok.csv", "wb").write(csv_rows(rows))
gzip.open("in/ok.csv.gz", "wb").write(csv_rows(rows))
cfg = open(f"{model}/config.json").read()
weights = open(f"{model}/model.safetensors", "rb").read()
os.mkfifo("in/fifo.y4m")
R = ["run", "--model", model]
E = ["eval", "--model", model, "--samples", "4", "--steps", "4", "--quiet"]

# ---- run: inputs ----
case("run y4m", R + ["--input", "in/clip.y4m"], want=0)
case("run missing input", R + ["--input", "in/nope.y4m"], want=1)
case("run empty file", R + ["--input", "in/empty"], want=1)
case("run /dev/null", R + ["--input", "/dev/null"], want=1)
case("run directory input (stills)", R + ["--input", "in/stills"], want=0)
os.makedirs("in/odd/x.png")
os.makedirs("in/odd/.git")
open("in/odd/._y.png", "wb").write(b"\0\5\26\7AppleDouble")
png("in/odd/z.png", 48, 48)
case("run dir with x.png dir, .git, ._ file", R + ["--input", "in/odd"], want=0)
os.makedirs("in/loop")
os.symlink("../loop", "in/loop/self")
case("run dir with a symlink loop", R + ["--input", "in/loop"], want=None)
open("in/mono.y4m", "wb").write(y4m(colour="Cmono"))
case("run Cmono y4m", R + ["--input", "in/mono.y4m"], want=None)
open("in/p10.y4m", "wb").write(y4m(colour="C420p10"))
case("run 10-bit y4m refused", R + ["--input", "in/p10.y4m"], want=1)
open("in/c444.y4m", "wb").write(y4m(colour="C444"))
case("run C444 y4m", R + ["--input", "in/c444.y4m"], want=None)
open("in/odd.y4m", "wb").write(y4m(w=3, h=3))
case("run 3x3 y4m", R + ["--input", "in/odd.y4m"], want=None)
open("in/1x1.y4m", "wb").write(y4m(w=1, h=1))
case("run 1x1 y4m", R + ["--input", "in/1x1.y4m"], want=None)
open("in/huge.y4m", "wb").write(y4m(header=b"YUV4MPEG2 W99999999 H99999999 F25:1\n", frames=0))
case("run huge y4m header", R + ["--input", "in/huge.y4m"], want=1)
open("in/zero.y4m", "wb").write(y4m(header=b"YUV4MPEG2 W0 H0\n", frames=0))
case("run W0 y4m", R + ["--input", "in/zero.y4m"], want=1)
open("in/noheader.y4m", "wb").write(b"YUV4MPEG2")
case("run header without newline", R + ["--input", "in/noheader.y4m"], want=1)
open("in/longheader.y4m", "wb").write(b"YUV4MPEG2 " + b"X" * 10_000_000)
case("run 10 MB header line", R + ["--input", "in/longheader.y4m"], want=1)
open("in/bin.y4m", "wb").write(b"YUV4MPEG2 W64 H48 \xff\xfe\x00\n" + b"FRAME\n" + bytes(4608))
case("run binary bytes in header", R + ["--input", "in/bin.y4m"], want=None)
open("in/badframe.y4m", "wb").write(y4m(frames=1) + b"FRAMEX\n" + bytes(4608))
case("run bad FRAME marker", R + ["--input", "in/badframe.y4m"], want=1)
open("in/fparams.y4m", "wb").write(y4m(frames=1).replace(b"FRAME\n", b"FRAME Ixyz\n"))
case("run FRAME with parameters", R + ["--input", "in/fparams.y4m"], want=0)
open("in/cut.y4m", "wb").write(y4m(frames=2)[:-100])
p = case("run truncated last frame", R + ["--input", "in/cut.y4m"], want=1)
if p is not None and b'"type":"summary"' not in p.stdout:
    report("run truncated last frame has a summary", False)
case("run y4m on stdin", R + ["--input", "-"], stdin=y4m(frames=2), want=0)
case("run garbage on stdin", R + ["--input", "-"], stdin=os.urandom(5000), want=1)
case("run /dev/stdin", R + ["--input", "/dev/stdin"], stdin=y4m(frames=2), want=0)
open("in/clip.yuv", "wb").write(y4m(frames=2))
case("run .yuv holding y4m", R + ["--input", "in/clip.yuv"], want=None)
open("in/raw.yuv", "wb").write(bytes(10000))
case("run raw .yuv", R + ["--input", "in/raw.yuv"], want=1)
png("in/bomb.png", 8, 8, declared=(20000, 20000))
case("run PNG declaring 20000x20000", R + ["--input", "in/bomb.png"], want=None, timeout=20)
png("in/bigdecl.png", 8, 8, declared=(100000, 1))
case("run PNG declaring 100000x1", R + ["--input", "in/bigdecl.png"], want=None, timeout=20)
open("in/trunc.png", "wb").write(open("in/stills/a.png", "rb").read()[:60])
case("run truncated PNG", R + ["--input", "in/trunc.png"], want=None)
open("in/fake.jpg", "wb").write(b"\xff\xd8\xff\xe0" + os.urandom(3000))
case("run random bytes .jpg", R + ["--input", "in/fake.jpg"], want=None)
open("in/text.png", "wb").write(b"hello")
case("run text named .png", R + ["--input", "in/text.png"], want=None)
open("in/a.bmp", "wb").write(b"BM" + bytes(100))
case("run broken .bmp", R + ["--input", "in/a.bmp"], want=None)
open("in/a.pgm", "wb").write(b"P5\n4 4\n255\n" + bytes(16))
case("run tiny .pgm", R + ["--input", "in/a.pgm"], want=0)
case("run two inputs", R + ["--input", "in/clip.y4m", "in/stills/a.png"], want=None)

# ---- run: options ----
for opt, val in [("--det-threshold", "0"), ("--det-threshold", "-1"), ("--det-threshold", "nan"),
                 ("--det-threshold", "inf"), ("--min-face", "0"), ("--min-face", "99999999999"),
                 ("--detect-width", "1"), ("--detect-every", "0"), ("--margin", "-1"),
                 ("--margin", "nan"), ("--margin", "1000"), ("--smooth", "0"), ("--smooth", "nan"),
                 ("--smooth", "2"), ("--max-fps", "-1"), ("--max-fps", "nan"),
                 ("--max-fps", "inf"), ("--status-every", "0.0001"), ("--status-every", "-1"),
                 ("--status-every", "nan"), ("--samples", "0"), ("--samples", "100000000"),
                 ("--steps", "0"), ("--steps", "1000"), ("--seed", "18446744073709551616"),
                 ("--tta", "bogus"), ("--device", "cuda"), ("--device", "tpu"),
                 ("--resolution", "0x0"), ("--resolution", "abc"), ("--fps", "0"),
                 ("--weights", "f8")]:
    case(f"run {opt} {val}", R + ["--input", "in/clip.y4m", opt, val], want=None, timeout=30)
case("run --camera 99", R + ["--camera", "99"], want=1)
case("run --samples 1 (no t-test possible)", R + ["--input", "in/clip.y4m", "--samples", "1"],
     want=None)

# ---- run: annotate ----
open("in/keep.y4m", "wb").write(b"mine")
case("run --annotate over an existing file", R + ["--input", "in/clip.y4m", "--annotate",
                                                  "in/keep.y4m"], want=1)
case("run --annotate into a missing dir", R + ["--input", "in/clip.y4m", "--annotate",
                                               "in/nodir/out.y4m"], want=1)
case("run --annotate /dev/full", R + ["--input", "in/clip.y4m", "--annotate", "/dev/full"],
     want=None)
case("run --annotate new file", R + ["--input", "in/clip.y4m", "--annotate", "out/a.y4m"],
     outputs=["out"], want=None)

# ---- models ----
def bad_model(name, config=None, weights_bytes=None):
    d = f"in/m-{name}"
    os.makedirs(d)
    open(f"{d}/config.json", "w").write(cfg if config is None else config)
    open(f"{d}/model.safetensors", "wb").write(weights if weights_bytes is None else weights_bytes)
    return d


for name, c, w in [
    ("empty config", "", None), ("config null", "null", None), ("config array", "[]", None),
    ("huge widths", cfg.replace('"widths": [\n      64', '"widths": [\n      4096'), None),
    ("huge hidden", cfg.replace('"hidden": 256', '"hidden": 100000'), None),
    ("zero classes", cfg.replace('"classes": [', '"classes_": ['), None),
    ("empty weights", None, b""), ("header length huge", None, struct.pack("<Q", 2**62) + b"{}"),
    ("header not json", None, struct.pack("<Q", 4) + b"abcd"),
    ("truncated weights", None, weights[: len(weights) // 2]),
    ("weights plus junk", None, weights + b"junk"),
]:
    d = bad_model(name.replace(" ", "-"), c, w)
    case(f"run model {name}", ["run", "--model", d, "--input", "in/clip.y4m"], want=1)
    case(f"eval model {name}", ["eval", "--model", d, "--data", "in/ok.csv", "--quiet"], want=1)
case("run model /dev/zero dir", ["run", "--model", "/dev/zero", "--input", "in/clip.y4m"], want=1)
d = "in/m-devzero"
os.makedirs(d)
open(f"{d}/config.json", "w").write(cfg)
os.symlink("/dev/zero", f"{d}/model.safetensors")
case("run model weights -> /dev/zero", ["run", "--model", d, "--input", "in/clip.y4m"], want=1,
     timeout=20)
d = "in/m-fifo"
os.makedirs(d)
os.mkfifo(f"{d}/config.json")
case("run model config is a FIFO", ["run", "--model", d, "--input", "in/clip.y4m"], want=1,
     timeout=20)

# ---- eval / data ----
def csv_case(name, data, want=1, extra=()):
    path = f"in/{name.replace(' ', '-')}.csv"
    open(path, "wb").write(data)
    case(f"eval csv {name}", E + ["--data", path, "--no-cache", *extra], want=want)


good = csv_rows(rows)
csv_case("ok", good, want=0)
csv_case("BOM", b"\xef\xbb\xbf" + good, want=None)
csv_case("CRLF", good.replace(b"\n", b"\r\n"), want=0)
csv_case("header only", b"emotion,pixels,Usage\n")
csv_case("no Usage column", b"emotion,pixels\n0," + b" ".join([b"1"] * 2304) + b"\n", want=None)
csv_case("pixel 256", good.replace(b",0 ", b",256 ", 1))
csv_case("pixel -1", good.replace(b",0 ", b",-1 ", 1))
csv_case("pixel nan", good.replace(b",0 ", b",nan ", 1))
csv_case("2303 pixels", b"emotion,pixels,Usage\n0," + b" ".join([b"1"] * 2303) + b",PrivateTest\n")
csv_case("emotion 7", good.replace(b"\n0,", b"\n7,", 1))
csv_case("emotion -1", good.replace(b"\n0,", b"\n-1,", 1))
csv_case("quoted pixels", good.replace(b"\n0,", b'\n0,"', 1).replace(b",Training\n", b'",Training\n', 1), want=None)
csv_case("binary", os.urandom(20000))
csv_case("one 50 MB line", b"emotion,pixels,Usage\n0," + b"1" * 50_000_000 + b",Training\n")
csv_case("split missing", good, extra=("--split", "Nope"))
csv_case("limit 0", good, want=None, extra=("--limit", "0"))
csv_case("batch 0", good, extra=("--batch-size", "0"))
open("in/cut.csv.gz", "wb").write(gzip.compress(good)[:-50])
case("eval truncated gzip", E + ["--data", "in/cut.csv.gz", "--no-cache"], want=1)
open("in/fake.csv.gz", "wb").write(b"\x1f\x8b" + os.urandom(1000))
case("eval corrupt gzip", E + ["--data", "in/fake.csv.gz", "--no-cache"], want=1)
case("eval data is a dir", E + ["--data", "in/stills"], want=1)
case("eval data /dev/zero", E + ["--data", "/dev/zero", "--no-cache"], want=1, timeout=20)
case("eval data FIFO", E + ["--data", "in/fifo.y4m", "--no-cache"], want=1, timeout=20)
case("eval --json new", E + ["--data", "in/ok.csv", "--split", "PrivateTest", "--json",
                             "out/e.json"], outputs=["out"], want=None)
case("eval --json is the data file", E + ["--data", "in/ok.csv", "--json", "in/ok.csv"],
     want=1)
case("eval --json into a directory", E + ["--data", "in/ok.csv", "--json", "in"], want=1)
case("eval --json /dev/stdout", E + ["--data", "in/ok.csv", "--json", "/dev/stdout"], want=0)
os.symlink("/dev/null", "in/null-link.json")
case("eval --json link to /dev/null", E + ["--data", "in/ok.csv", "--json",
                                          "in/null-link.json"], want=0)
case("eval --json /dev/full", E + ["--data", "in/ok.csv", "--json", "/dev/full"], want=1)
os.environ_backup = dict(ENV)
ENV["FER_CAM_CACHE"] = ""
case("eval empty FER_CAM_CACHE", E + ["--data", "in/ok.csv"], want=None)
ENV["FER_CAM_CACHE"] = "/dev/null/x"
case("eval unwritable cache", E + ["--data", "in/ok.csv"], want=None)
ENV.update(os.environ_backup)
case("data info binary file", ["data", "--data", "in/bin.y4m"], want=1)

# ---- train / calibrate / export / report / init ----
T = ["train", "classifier", "--data", "in/ok.csv", "--no-cache", "--quiet", "--stem",
     "conv7x7_pool", "--from-scratch", "--classifier-epochs", "1", "--batch-size", "4"]
os.makedirs("in/userdir")
open("in/userdir/config.json", "w").write('{"mine": true}')
case("train into a user's dir", T + ["--run-dir", "in/userdir"], want=1)
case("train run-dir is a file", T + ["--run-dir", "in/ok.csv"], want=1)
case("train --lr nan", T + ["--run-dir", "out/t1", "--lr", "nan"], want=1, outputs=["out"])
case("train --batch-size 0", T[:-2] + ["--run-dir", "out/t2", "--batch-size", "0"], want=1,
     outputs=["out"])
case("train --config missing", T + ["--run-dir", "out/t3", "--config", "in/nope.json"], want=1,
     outputs=["out"])
case("train --config binary", T + ["--run-dir", "out/t4", "--config", "in/bin.y4m"], want=1,
     outputs=["out"])
case("train --resume nothing", T + ["--run-dir", "out/t5", "--resume"], want=1, outputs=["out"])
case("calibrate --out not json", ["calibrate", "--model", model, "--data", "in/ok.csv",
                                  "--split", "PublicTest", "--out", "out/c.txt"], want=1,
     outputs=["out"])
open("in/keep.json", "w").write("{}")
case("calibrate --out existing", ["calibrate", "--model", model, "--data", "in/ok.csv",
                                  "--split", "PublicTest", "--out", "in/keep.json"], want=1)
case("export over an existing dir", ["export", "--model", model, "--out", "in/stills"], want=1)
case("export onto itself", ["export", "--model", model, "--out", model], want=1)
case("export calibration garbage", ["export", "--model", model, "--calibration", "in/ok.csv",
                                    "--out", "out/x"], want=1, outputs=["out"])
case("init --force over a user's dir", ["init", "--out", "in/userdir", "--force"], want=1)
case("init over a file", ["init", "--out", "in/ok.csv", "--force"], want=1)
case("report garbage", ["report", "--out", "out/r1", "in/ok.csv"], want=None, outputs=["out"])
case("report into non-empty dir", ["report", "--out", "in/stills", "in/ok.csv"], want=1)
case("report empty stdin", ["report", "--out", "out/r2"], stdin=b"", want=None, outputs=["out"])

# ---- round two: crash windows, concurrent writers, injection, NaN answers, bounds ----
for steps in ("1", "2", "3"):
    case(f"run --steps {steps} (too few to be right)", R + ["--input", "in/clip.y4m", "--steps",
                                                          steps], want=1)
case("run --max-faces 0", R + ["--input", "in/clip.y4m", "--max-faces", "0"], want=1)
case("run --live on a file", R + ["--input", "in/clip.y4m", "--live"], want=1)
case("run --sequence on video", R + ["--input", "in/clip.y4m", "--sequence"], want=1)
open("in/fake.mp4", "wb").write(b"\0\0\0\x18ftypmp42" + bytes(200))
case("run an undecodable mp4", R + ["--input", "in/fake.mp4"], want=1)
case("run two video inputs", R + ["--input", "in/clip.y4m", "in/clip.y4m"], want=1)
case("init --classes with a newline", ["init", "--out", "out/nl", "--classes",
                                       "a\nerror: forged,b"], want=1, outputs=["out"])
case("init --classes with ESC", ["init", "--out", "out/esc", "--classes", "\x1b[2Jx,b"], want=1,
     outputs=["out"])
bad_cfg = cfg.replace('"angry"', '"an\\u001bgry"')
os.makedirs("in/esc-model", exist_ok=True)
open("in/esc-model/config.json", "w").write(bad_cfg)
open("in/esc-model/model.safetensors", "wb").write(weights)
case("model with a control character in a class", ["run", "--model", "in/esc-model", "--input",
                                                   "in/clip.y4m"], want=1)
run_lines = subprocess.run([BIN] + R + ["--input", "in/clip.y4m", "--samples", "2"],
                           capture_output=True, env=ENV).stdout
gzip.open("in/run.jsonl.gz", "wb").write(run_lines)
case("report gzip", ["report", "--out", "out/rg", "in/run.jsonl.gz"], want=0, outputs=["out"])
open("in/run-utf16.jsonl", "wb").write(b"\xff\xfe" + run_lines.decode().encode("utf-16-le"))
case("report UTF-16", ["report", "--out", "out/ru", "in/run-utf16.jsonl"], want=1,
     outputs=["out"])
open("in/run-bom.jsonl", "wb").write(b"\xef\xbb\xbf" + run_lines)
case("report with a BOM", ["report", "--out", "out/rb", "in/run-bom.jsonl"], want=0,
     outputs=["out"])
open("in/two-runs.jsonl", "wb").write(run_lines + run_lines)
case("report appended runs", ["report", "--out", "out/r2r", "in/two-runs.jsonl"], want=0,
     outputs=["out"])
case("report /dev/zero", ["report", "--out", "out/rz", "/dev/zero"], want=1, timeout=120,
     outputs=["out"])
os.makedirs("in/ro", exist_ok=True)
os.chmod("in/ro", 0o555)
# (root writes into a read-only folder: then the write is expected)
case("eval --json into a read-only folder", E + ["--data", "in/ok.csv", "--json",
                                                 "in/ro/e.json"],
     want=None if os.geteuid() == 0 else 1, outputs=["in/ro"] if os.geteuid() == 0 else ())
if os.path.exists("/dev/full"):
    case("run --annotate /dev/full", R + ["--input", "in/clip.y4m", "--annotate", "/dev/full"],
         want=1)
for step in ("dir:locked", "dir:tmp-made", "dir:filled", "dir:synced", "dir:old-moved",
             "dir:new-in", "dir:done"):
    subprocess.run([BIN, "init", "--out", "out/crash", "--stem", "conv7x7_pool", "--force"],
                   capture_output=True, env=ENV)
    subprocess.run([BIN, "init", "--out", "out/crash", "--stem", "conv7x7_pool", "--force"],
                   capture_output=True, env=dict(ENV, FER_CAM_CRASH_AT=step))
    case(f"write after a kill at {step}", ["init", "--out", "out/crash", "--stem",
                                           "conv7x7_pool", "--force"], want=0, outputs=["out"])
    left = sorted(n for n in os.listdir("out") if n.startswith(".crash"))
    report(f"no leftovers after a kill at {step}", not left, str(left))
for i in range(4):
    procs = [subprocess.Popen([BIN, "export", "--model", model, "--out", f"out/twin{i}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
             for _ in range(2)]
    codes = sorted(p.wait() for p in procs)
    report(f"two exports to one new output ({i})", codes == [0, 1], str(codes))
open("in/secret.json", "w").write("{}")
os.chmod("in/secret.json", 0o600)
case("eval --json keeps a replaced file's mode", E + ["--data", "in/ok.csv", "--json",
                                                      "in/secret.json"], want=0,
     outputs=["in/secret.json"])
report("replaced file mode kept", os.stat("in/secret.json").st_mode & 0o777 == 0o600,
       oct(os.stat("in/secret.json").st_mode & 0o777))

# Owners: root replacing another user's file gives it back to that user; a user other than
# root replacing its own file keeps it, and replacing root's file (in a folder it may write) makes
# it the user's, mode kept, as an editor's save would.
if os.geteuid() == 0:
    open("in/theirs.json", "w").write("{}")
    os.chmod("in/theirs.json", 0o640)
    os.chown("in/theirs.json", 12345, 12345)
    case("eval --json replaces another user's file", E + ["--data", "in/ok.csv", "--json",
                                                          "in/theirs.json"], want=0,
         outputs=["in/theirs.json"])
    st = os.stat("in/theirs.json")
    report("replaced file keeps its owner (root)",
           (st.st_uid, st.st_gid, st.st_mode & 0o777) == (12345, 12345, 0o640),
           f"{st.st_uid}:{st.st_gid} {oct(st.st_mode & 0o777)}")
    setpriv = subprocess.run(["sh", "-c", "command -v setpriv"], capture_output=True,
                             text=True).stdout.strip()
    as_user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    if setpriv and subprocess.run(as_user + [BIN, "--version"], capture_output=True,
                                  env=ENV).returncode != 0:
        print("(user 65534 cannot run the binary from where it is: the non-root owner cases "
              "are not run)")
        setpriv = ""
    if setpriv:
        os.chmod(ROOT, 0o711)
        user = os.path.join(ROOT, "nobody")
        os.makedirs(user)
        os.chown(user, 65534, 65534)
        uenv = dict(ENV, FER_CAM_CACHE=os.path.join(user, "cache"))
        for label, owner, mode in (("its own", 65534, 0o604), ("root's", 0, 0o644)):
            f = os.path.join(user, f"{owner}.json")
            open(f, "w").write("{}")
            os.chmod(f, mode)
            os.chown(f, owner, owner)
            p = subprocess.run(as_user + [BIN] + E + ["--data", os.path.abspath("in/ok.csv"),
                                                      "--json", f],
                               capture_output=True, env=uenv, timeout=60)
            st = os.stat(f)
            got = (p.returncode, st.st_uid, st.st_mode & 0o777)
            report(f"a user other than root replaces {label} file", got == (0, 65534, mode),
                   f"exit, owner, mode {got}: {p.stderr.decode(errors='replace')[-200:]}")
    else:
        print("(setpriv missing: the non-root owner cases are not run)")

# A full disk: a small tmpfs (where this machine lets us mount one), filled to the last byte.
# Each write must fail with one error line, leave no temp file behind and change no file that
# was there before.
full = os.path.join(ROOT, "full")
os.makedirs(full)
mounted = os.geteuid() == 0 and subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", full], capture_output=True
).returncode == 0
if mounted:
    try:
        open(os.path.join(full, "kept.json"), "w").write('{"kept": true}')
        with open(os.path.join(full, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 512)
            except OSError:
                pass
        for name, args in (
            ("eval --json", E + ["--data", "in/ok.csv", "--json", "full/e.json"]),
            ("eval --json over a file", E + ["--data", "in/ok.csv", "--json", "full/kept.json"]),
            ("export", ["export", "--model", model, "--out", "full/m"]),
            ("run --annotate", R + ["--input", "in/clip.y4m", "--annotate", "full/a.y4m"]),
            ("train --run-dir", T + ["--run-dir", "full/run"]),
            ("report --out", ["report", "--out", "full/rep", "in/run.jsonl.gz"]),
        ):
            listed = sorted(os.listdir(full))
            # The run directory and the annotated video are the outputs themselves (the video
            # keeps the frames written before the disk filled; the run counts them).
            own = {"train --run-dir": "run", "run --annotate": "a.y4m"}.get(name)
            case(f"full disk: {name}", args, want=1, outputs=[f"full/{own}"] if own else ())
            left = sorted(set(os.listdir(full)) - set(listed) - {own})
            report(f"full disk: {name} leaves nothing behind", not left, str(left))
    finally:
        subprocess.run(["umount", full], capture_output=True)
    # A read-only file system (which stops root too, unlike a read-only folder).
    ro = os.path.join(ROOT, "ro-fs")
    os.makedirs(ro)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", ro],
                      capture_output=True).returncode == 0:
        try:
            open(os.path.join(ro, "kept.json"), "w").write('{"kept": true}')
            subprocess.run(["mount", "-o", "remount,ro", ro], check=True, capture_output=True)
            for name, args in (
                ("eval --json", E + ["--data", "in/ok.csv", "--json", "ro-fs/e.json"]),
                ("eval --json over a file", E + ["--data", "in/ok.csv", "--json",
                                                 "ro-fs/kept.json"]),
                ("export", ["export", "--model", model, "--out", "ro-fs/m"]),
                ("train --run-dir", T + ["--run-dir", "ro-fs/run"]),
            ):
                case(f"read-only file system: {name}", args, want=1)
        finally:
            subprocess.run(["umount", ro], capture_output=True)
else:
    print("(no tmpfs could be mounted here: the full-disk and read-only cases are not run)")

p = subprocess.run([BIN, "init", "--out", "out/ray", "--stem", "conv7x7_pool"],
                   capture_output=True, env=dict(ENV, RAYON_NUM_THREADS="100000"), timeout=60)
report("absurd RAYON_NUM_THREADS is ignored with a warning",
       p.returncode == 0 and b"ignored" in p.stderr, p.stderr.decode(errors="replace")[-200:])
case("train --classifier-epochs 0", ["train", "classifier", "--data", "in/ok.csv", "--run-dir",
                                     "out/zero", "--classifier-epochs", "0"], want=1,
     outputs=["out"])
for label, name in (("non-UTF-8", b"sad\xff"), ("ESC", b"sad\x1b[2J")):
    root = f"in/folder-{label}".encode()
    os.makedirs(root + b"/train/" + name, exist_ok=True)
    png((root + b"/train/" + name + b"/a.png").decode(errors="surrogateescape"), 48, 48)
    case(f"folder data with a {label} class name", ["data", "--data", root.decode(), "--no-cache"],
         want=1)
os.makedirs("in/folder-webp/train/fear", exist_ok=True)
os.makedirs("in/folder-webp/train/happy", exist_ok=True)
png("in/folder-webp/train/happy/a.png", 48, 48)
open("in/folder-webp/train/fear/a.webp", "wb").write(b"RIFF\0\0\0\0WEBPVP8 ")
case("folder data with a webp-only class", ["data", "--data", "in/folder-webp", "--no-cache"],
     want=1)

# ---- signals ----
signal_case("SIGTERM: silent stdin", R + ["--input", "-"], stdin_pipe=True)
signal_case("SIGTERM: FIFO with no writer", R + ["--input", "in/fifo.y4m"])
png("in/stills/big.png", 4000, 3000, pixels=lambda x, y: (x ^ y) & 255)
signal_case("SIGTERM: large still", R + ["--input", "in/stills", "in/stills", "in/stills"],
            delay=1.5)

bad = [n for n, ok in results if not ok]
print(f"\n{len(results)} cases, {len(bad)} misbehaved" + (": " + ", ".join(bad) if bad else ""))
print(f"(sandbox kept at {ROOT})")
sys.exit(1 if bad else 0)
