"""The human-evaluation study: a real headless Chromium takes it from file://, the scorer reads the
downloads back; the participant-facing files leak neither class nor condition; bad response files fail
loudly."""
from __future__ import annotations

import csv
import http.server
import json
import math
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from overinterp.cli import main
from overinterp.data import CIFAR10_MEAN, load_split
from overinterp.humaneval import CONDITIONS, ResponseError, neutralize_formulas, read_key, score, wilson_interval
from overinterp.subsets import random_keep, save_keep_masks

COUNTS = {"bs": 20, "random": 20, "full": 10}
CONDITION_WORDS = ("bs", "random", "full", "attention", "backward", "selection", "subset", "condition", "mask")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def masks(cifar_npz, tmp_path_factory) -> dict[str, Path]:
    """Keep-masks of 52 pixels per image in the subsets' file format (the study treats any keep-mask alike)."""
    out = tmp_path_factory.mktemp("masks")
    test = load_split(cifar_npz, "test")
    paths = {}
    for name, seed in (("bs", 11), ("random", 12)):
        paths[name] = out / f"{name}.npz"
        save_keep_masks(paths[name], 32, 32, test=(test.index, random_keep(len(test), 1024, 52, seed)))
    return paths


def build_study(npz: Path, masks: dict[str, Path], out: Path, post_url: str | None = None,
                reproduce: Path | None = None) -> dict[str, Path]:
    paths = {"bundle": out / "study", "zip": out / "study.zip", "key": out / "answer_key.csv",
             "manifest": out / "manifest.csv"}
    args = ["humaneval", "build", "--data", str(npz), "--bs-masks", str(masks["bs"]),
            "--random-masks", str(masks["random"]), "--display-size", "192"]
    for i, (name, count) in enumerate(COUNTS.items()):
        args += [f"--{name}-count", str(count), f"--{name}-seed", str(100 + i)]
    for name, path in paths.items():
        args += [f"--{name}", str(path)]
    if post_url:
        args += ["--post-url", post_url]
    if reproduce:
        args += ["--reproduce", str(reproduce)]
    assert main(args) == 0
    return paths


class Receiver(http.server.BaseHTTPRequestHandler):
    """Collects POSTed bodies, answering with the CORS header a real endpoint needs."""

    bodies: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
        self.send_response(200)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/responses", Receiver.bodies
    server.shutdown()


@pytest.fixture(scope="module")
def study(cifar_npz, masks, receiver, tmp_path_factory) -> dict[str, Path]:
    return build_study(cifar_npz, masks, tmp_path_factory.mktemp("study"), post_url=receiver[0])


# ------------------------------------------------------------------------------------------- the build
def test_key_samples_each_condition_across_classes_without_sharing_images(study, cifar_npz):
    key = read_key(study["key"])
    assert key.groupby("condition").size().to_dict() == COUNTS
    for condition, count in COUNTS.items():
        per_class = key[key["condition"] == condition].groupby("label").size()
        assert len(per_class) == 10 and per_class.max() - per_class.min() <= 1, condition
    assert key["source_index"].is_unique  # no image in two conditions
    test = load_split(cifar_npz, "test")
    labels = dict(zip(test.index, test.labels.numpy()))
    assert all(labels[i] == label for i, label in zip(key["source_index"], key["label"]))
    assert sorted(set(key["keep_fraction"])) == pytest.approx([52 / 1024, 1.0], abs=1e-6)


def test_pictures_show_kept_pixels_and_the_mean_colour_elsewhere(study, cifar_npz, masks):
    from overinterp.subsets import load_keep_masks

    key = read_key(study["key"]).set_index("image_id")
    test = load_split(cifar_npz, "test")
    position = {int(i): p for p, i in enumerate(test.index)}
    keep = {c: load_keep_masks(masks[c], "test", test.index).numpy()[:, 0] for c in ("bs", "random")}
    mean_colour = np.round(np.array(CIFAR10_MEAN) * 255).astype(int)
    for image_id, row in key.iterrows():
        with Image.open(study["bundle"] / "images" / f"{image_id}.png") as image:
            assert image.size == (32, 32) and image.mode == "RGB"
            rgb = np.asarray(image).astype(int)
        original = test.images[position[row["source_index"]]].permute(1, 2, 0).numpy().astype(int)
        if row["condition"] == "full":
            np.testing.assert_array_equal(rgb, original)
        else:
            kept = keep[row["condition"]][position[row["source_index"]]]
            np.testing.assert_array_equal(rgb[kept], original[kept])
            np.testing.assert_array_equal(rgb[~kept], np.broadcast_to(mean_colour, rgb[~kept].shape))


def png_chunks(data: bytes) -> list[str]:
    assert data.startswith(PNG_SIGNATURE)
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append(data[pos + 4:pos + 8].decode("ascii"))
        pos += 12 + length
    return chunks


def participant_facing(study: dict[str, Path]) -> dict[str, bytes]:
    """Every file a participant (or crowd worker) can see: the folder, the zip's entries, the manifest."""
    files = {f"folder/{p.relative_to(study['bundle']).as_posix()}": p.read_bytes()
             for p in sorted(study["bundle"].rglob("*")) if p.is_file()}
    with zipfile.ZipFile(study["zip"]) as archive:
        assert archive.comment == b""
        for info in archive.infolist():
            assert info.comment == b"" and info.extra == b"" and info.date_time == (1980, 1, 1, 0, 0, 0)
            files[f"zip/{info.filename}"] = archive.read(info)
    files["manifest.csv"] = study["manifest"].read_bytes()
    return files


def test_participant_facing_files_reveal_no_class_condition_or_label(study, cifar_npz):
    classes = load_split(cifar_npz, "test", 10).classes
    key = read_key(study["key"])
    files = participant_facing(study)
    folder = {name[len("folder/"):]: data for name, data in files.items() if name.startswith("folder/")}
    assert {name[len("zip/study/"):]: data for name, data in files.items() if name.startswith("zip/")} == folder
    assert set(folder) == {"index.html", "study.js", "study.css", "study-data.js"} | {
        f"images/{i}.png" for i in key["image_id"]}
    words = re.compile(r"\b(" + "|".join(map(re.escape, classes + list(CONDITION_WORDS))) + r")\b", re.I)
    for name, data in files.items():
        assert not words.search(name), name
        if name.endswith(".png"):
            # Only pixel data: no text, time or other ancillary chunk that could carry an answer.
            assert png_chunks(data) == ["IHDR", "IDAT", "IEND"], name
            continue
        text = data.decode("utf-8")
        if name.endswith("study-data.js"):
            payload = json.loads(text.removeprefix("window.STUDY_DATA = ").rstrip().rstrip(";"))
            assert set(payload) == {"study", "choices", "items", "display_size", "post_url"}
            assert payload["choices"] == classes  # the ten choices, always in the same order
            assert payload["items"] == sorted(key["image_id"])  # ids only, in an order unrelated to the answer
            assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in payload["items"])
            assert isinstance(payload["display_size"], int) and isinstance(payload["study"], str)
            assert text == f"window.STUDY_DATA = {json.dumps(payload, indent=1)};\n"  # nothing beside the data
            # The class names appear as the choices only; nothing else may name a class or condition.
            text = json.dumps({k: v for k, v in payload.items() if k != "choices"})
        found = words.findall(text)
        assert not found, f"{name} mentions {sorted(set(found))}"
    manifest = pd.read_csv(study["manifest"], dtype=str)
    assert list(manifest.columns) == ["task", "study", "image_id", "image_url"]
    assert sorted(manifest["image_url"]) == sorted(f"images/{i}.png" for i in key["image_id"])


def label_changes(ids: list[str], key: pd.DataFrame) -> int:
    labels = key.set_index("image_id").loc[ids, "label"].to_numpy()
    return int((labels[1:] != labels[:-1]).sum())


def test_answers_play_no_part_in_the_bundle_text(study, cifar_npz, masks, receiver, tmp_path):
    """Relabel every test image and rebuild: the page's text and file names stay byte for byte the same
    once the random ids and the content-derived study id are blanked out, so nothing in them can depend
    on the answers."""
    arrays = dict(np.load(cifar_npz))
    arrays["test_labels"] = (arrays["test_labels"] + 3) % 10
    relabelled = tmp_path / "relabelled.npz"
    np.savez(relabelled, **arrays)
    other = build_study(relabelled, masks, tmp_path / "other", post_url=receiver[0])

    def blank(text: str, built: dict[str, Path]) -> str:
        key = read_key(built["key"])
        for token in [key["study"].iloc[0], *key["image_id"]]:
            text = text.replace(token, "ID")
        return text

    names = [sorted(blank(str(p.relative_to(s["bundle"])), s) for p in s["bundle"].rglob("*")) for s in (study, other)]
    assert names[0] == names[1]
    for name in ("index.html", "study.js", "study.css", "study-data.js"):
        assert blank((study["bundle"] / name).read_text(), study) == blank((other["bundle"] / name).read_text(), other)
    assert blank(study["manifest"].read_text(), study) == blank(other["manifest"].read_text(), other)
    # Neither the ids' order nor the manifest's groups images by class.
    key = read_key(study["key"])
    assert label_changes(sorted(key["image_id"]), key) > 0.6 * (len(key) - 1)
    assert label_changes(list(pd.read_csv(study["manifest"], dtype=str)["image_id"]), key) > 0.6 * (len(key) - 1)


def test_a_rebuild_gets_new_ids_unless_given_the_answer_key(study, cifar_npz, masks, tmp_path, receiver, capsys):
    fresh = build_study(cifar_npz, masks, tmp_path / "fresh", post_url=receiver[0])
    old, new = read_key(study["key"]), read_key(fresh["key"])
    assert not set(old["image_id"]) & set(new["image_id"])  # same settings, no id in common
    columns = ["condition", "source_index", "label"]  # the same images were drawn
    assert old.sort_values(columns)[columns].reset_index(drop=True).equals(new.sort_values(columns)[columns].reset_index(drop=True))
    again = build_study(cifar_npz, masks, tmp_path / "again", post_url=receiver[0], reproduce=study["key"])
    for name in ("zip", "key", "manifest"):
        assert again[name].read_bytes() == study[name].read_bytes(), name
    # The key of another study (here: other images drawn for the full condition) is refused, naming it.
    args = ["humaneval", "build", "--data", str(cifar_npz), "--full-count", "10", "--full-seed", "999",
            "--reproduce", str(study["key"]), "--bundle", str(tmp_path / "x"), "--zip", str(tmp_path / "x.zip"),
            "--key", str(tmp_path / "x.csv"), "--manifest", str(tmp_path / "xm.csv")]
    assert main(args) == 2
    assert f"--reproduce {study['key']}: that answer key is of another study" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def attacker_guesses(study: dict[str, Path], counts: dict[str, int]) -> dict[str, dict[str, str]]:
    """Every attack on the conditions that needs only what a participant has besides the pictures' pixels:
    the config (counts, seeds), the public test set and the bundle. Returns attack -> image id -> guess."""
    folder, manifest = study["bundle"], pd.read_csv(study["manifest"], dtype=str)
    payload = json.loads((folder / "study-data.js").read_text().removeprefix("window.STUDY_DATA = ").rstrip().rstrip(";"))
    items = payload["items"]
    in_key_order = [c for c, n in counts.items() for _ in range(n)]  # how the builder lists the conditions
    guesses = {}
    # 1. Regenerate the ids from seeds (the config's, or any small one), as the seeded ids once allowed.
    for seed in range(2000):
        rng = np.random.default_rng(seed)
        candidates = [rng.bytes(8).hex() for _ in items]
        if set(candidates) & set(items):
            guesses["seeded ids"] = {i: in_key_order[candidates.index(i)] for i in items if i in candidates}
            break
    # 2. Order: the page's list, the manifest's, and the file system's listing, read as the builder's order.
    guesses["page order"] = dict(zip(items, in_key_order))
    guesses["manifest order"] = dict(zip(manifest["image_id"], in_key_order))
    listing = [Path(p.name).stem for p in os.scandir(folder / "images")]
    guesses["directory order"] = dict(zip(listing, in_key_order))
    # 3. File sizes, in the folder and in the zip: the largest files as full images, the rest as subsets.
    def by_size(sizes):
        ranked = sorted(sizes, key=lambda i: (-sizes[i], i))
        return {i: "full" if r < counts["full"] else "bs" for r, i in enumerate(ranked)}
    guesses["file size"] = by_size({i: (folder / "images" / f"{i}.png").stat().st_size for i in items})
    with zipfile.ZipFile(study["zip"]) as archive:
        guesses["zip size"] = by_size({Path(z.filename).stem: z.compress_size for z in archive.infolist()
                                       if z.filename.endswith(".png")})
    return guesses


def test_an_attacker_with_the_config_and_the_bundle_does_no_better_than_chance(study):
    from scipy.stats import binomtest

    key = read_key(study["key"]).set_index("image_id")
    guesses = attacker_guesses(study, COUNTS)
    assert "seeded ids" not in guesses  # no seed regenerates a single id
    sizes = {(study["bundle"] / "images" / f"{i}.png").stat().st_size for i in key.index}
    assert len(sizes) == 1  # every picture has the same file size
    with zipfile.ZipFile(study["zip"]) as archive:
        assert len({z.compress_size for z in archive.infolist() if z.filename.endswith(".png")}) == 1
    # Against a guess that knows only the counts, no attack is better (one-sided binomial test at 0.1% for
    # each attack); the best blind guess is the largest condition everywhere. Each attack's expected hit
    # rate on random ids is below that guess's, so a correct build fails this far less than once in 1,000.
    chance = max(COUNTS.values()) / len(key)
    for attack, guess in guesses.items():
        hits = sum(key.loc[i, "condition"] == g for i, g in guess.items())
        p = binomtest(hits, len(guess), chance, alternative="greater").pvalue
        assert p > 0.001, f"{attack}: {hits} of {len(guess)} conditions recovered (chance {chance:.2f}), p = {p:.2g}"


def test_the_seeded_builder_of_earlier_versions_is_caught_by_the_attacker(study, tmp_path):
    """The attacker test can fail: give the bundle ids from a seed, in the builder's key order, as the
    earlier builder did, and compressed pictures; the seed and the sizes give the conditions away."""
    key = read_key(study["key"])
    order = {c: i for i, c in enumerate(COUNTS)}
    key = key.assign(_o=key["condition"].map(order)).sort_values(["_o", "source_index"])
    rng = np.random.default_rng(104)
    seeded = dict(zip(key["image_id"], (rng.bytes(8).hex() for _ in range(len(key)))))
    forged = {"bundle": tmp_path / "study", "zip": tmp_path / "study.zip", "manifest": tmp_path / "manifest.csv"}
    (forged["bundle"] / "images").mkdir(parents=True)
    payload = json.loads((study["bundle"] / "study-data.js").read_text().removeprefix("window.STUDY_DATA = ").rstrip().rstrip(";"))
    payload["items"] = sorted(seeded.values())
    (forged["bundle"] / "study-data.js").write_text(f"window.STUDY_DATA = {json.dumps(payload)};\n")
    with zipfile.ZipFile(forged["zip"], "w", zipfile.ZIP_DEFLATED) as archive:
        for old, new in seeded.items():
            picture = Image.open(study["bundle"] / "images" / f"{old}.png")
            picture.save(forged["bundle"] / "images" / f"{new}.png", optimize=True)
            archive.write(forged["bundle"] / "images" / f"{new}.png", f"study/images/{new}.png")
    pd.DataFrame({"image_id": sorted(seeded.values())}).to_csv(forged["manifest"], index=False)
    guesses = attacker_guesses(forged, COUNTS)
    truth = dict(zip(seeded.values(), key["condition"]))
    assert all(truth[i] == g for i, g in guesses["seeded ids"].items()) and len(guesses["seeded ids"]) == len(key)
    assert [truth[i] for i, g in guesses["file size"].items() if g == "full"] == ["full"] * COUNTS["full"]


def test_a_full_disk_leaves_the_old_study_whole(study, cifar_npz, masks, tmp_path):
    """A build that cannot finish writing (a file-size limit, as a full disk would) replaces nothing:
    the old bundle, zip, key and manifest still belong together and no temporary file is left."""
    import resource
    import subprocess
    import sys

    work = tmp_path / "w"
    shutil.copytree(study["bundle"].parent, work)
    before = {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    args = [sys.executable, "-m", "overinterp", "humaneval", "build", "--data", str(cifar_npz),
            "--bs-masks", str(masks["bs"]), "--random-masks", str(masks["random"])]
    for i, (name, count) in enumerate(COUNTS.items()):
        args += [f"--{name}-count", str(count), f"--{name}-seed", str(100 + i)]
    args += ["--bundle", str(work / "study"), "--zip", str(work / "study.zip"), "--key", str(work / "answer_key.csv"),
             "--manifest", str(work / "manifest.csv")]
    zip_size = (work / "study.zip").stat().st_size  # larger than any other file the build writes
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (zip_size // 2, zip_size // 2))  # noqa: E731
    result = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit)
    assert result.returncode == 2 and "File too large" in result.stderr and "Traceback" not in result.stderr
    after = {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before  # nothing replaced, nothing added
    assert not [p for p in work.rglob("*") if p.name.startswith(".")]


def test_build_refuses_a_key_inside_the_bundle_and_too_few_images(cifar_npz, masks, tmp_path, capsys):
    def build(*extra, key=tmp_path / "k.csv"):
        return main(["humaneval", "build", "--data", str(cifar_npz), "--bundle", str(tmp_path / "s"),
                     "--zip", str(tmp_path / "s.zip"), "--manifest", str(tmp_path / "m.csv"), "--key", str(key), *extra])

    assert build("--full-count", "10", key=tmp_path / "s" / "key.csv") == 2
    assert "outside the study folder" in capsys.readouterr().err
    assert build("--full-count", "210") == 2
    assert "unused test images" in capsys.readouterr().err
    assert build("--bs-count", "5") == 2
    assert "--bs-count 5 needs --bs-masks" in capsys.readouterr().err
    assert build() == 2
    assert "the study has no images" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------- the browser
def scripted_answer(participant: str, trial: int, row: pd.Series) -> int:
    """The known pattern: 'careful' answers every attention check right, backward-selection pictures right
    on every third trial and random ones on every fourth; 'careless' always answers the next class."""
    wrong = (int(row["label"]) + 1) % 10
    if participant == "careless":
        return wrong
    right = {"full": True, "bs": trial % 3 == 0, "random": trial % 4 == 0}[row["condition"]]
    return int(row["label"]) if right else wrong


def wait_for(driver, condition, timeout: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: condition())


def take_study(driver, index_url: str, participant: str, key: pd.DataFrame, via_url: bool,
               reload_after: int | None = None) -> list[str]:
    """Answer every picture (odd trials by click, even by number key); returns the order seen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    find = lambda element_id: driver.find_element(By.ID, element_id)  # noqa: E731
    driver.get(f"{index_url}?pid={participant}" if via_url else index_url)
    if via_url:
        assert find("pid").get_attribute("value") == participant
        find("begin").click()
    else:
        find("begin").click()
        wait_for(driver, lambda: "enter your participant ID" in find("start-error").text)
        find("pid").send_keys(participant, Keys.ENTER)
    rows = key.set_index("image_id")
    seen = []
    for trial in range(1, len(key) + 1):
        wait_for(driver, lambda: find("progress-text").text == f"Picture {trial} of {len(key)}"
                 and find("trial").get_attribute("aria-busy") == "false")
        image_id = find("stimulus").get_attribute("src").rsplit("/", 1)[1].removesuffix(".png")
        seen.append(image_id)
        choice = scripted_answer(participant, trial, rows.loc[image_id])
        if trial % 2:
            driver.find_element(By.CSS_SELECTOR, f"#choices button[data-key='{choice}']").click()
        else:
            driver.find_element(By.TAG_NAME, "body").send_keys(str(choice))
        if trial == reload_after:  # a reload resumes where the participant left off
            wait_for(driver, lambda: find("progress-text").text == f"Picture {trial + 1} of {len(key)}")
            driver.get(f"{index_url}?pid={participant}")
            find("begin").click()
    wait_for(driver, lambda: find("done").is_displayed())
    find("download").click()
    target = driver.downloads / f"responses-{participant}.csv"
    wait_for(driver, target.exists)
    wait_for(driver, lambda: find("upload-status").get_attribute("data-sent") is not None)
    assert find("upload-status").get_attribute("data-sent") == "true", find("upload-status").text
    return seen


def expected_counts(participant: str, order: list[str], key: pd.DataFrame) -> dict[str, tuple[int, int]]:
    rows = key.set_index("image_id")
    counts = {c: [0, 0] for c in CONDITIONS}
    for trial, image_id in enumerate(order, 1):
        row = rows.loc[image_id]
        counts[row["condition"]][0] += scripted_answer(participant, trial, row) == row["label"]
        counts[row["condition"]][1] += 1
    return {c: tuple(v) for c, v in counts.items()}


def test_chromium_takes_the_study_from_file_and_the_scorer_reads_it_back(study, browser, receiver, cifar_npz, tmp_path):
    key = read_key(study["key"])
    index_url = (study["bundle"] / "index.html").resolve().as_uri()
    careful = take_study(browser, index_url, "careful", key, via_url=True, reload_after=7)
    careless = take_study(browser, index_url, "careless", key, via_url=False)

    # Every picture once; the order is the participant's reproducible shuffle, different per participant
    # and not grouped by class.
    assert sorted(careful) == sorted(careless) == sorted(key["image_id"])
    assert browser.execute_script("return window.studyOrder(arguments[0])", "careful") == careful
    assert browser.execute_script("return window.studyOrder(arguments[0])", "careless") == careless
    assert careful != careless
    assert label_changes(careful, key) > 0.6 * (len(key) - 1)

    downloads = [browser.downloads / f"responses-{p}.csv" for p in ("careful", "careless")]
    assert sorted(receiver[1]) == sorted(p.read_bytes().decode() for p in downloads)  # the POSTs carry the same CSV
    # Reopening a finished study shows the end screen and does not send the answers twice.
    from selenium.webdriver.common.by import By

    browser.get(f"{index_url}?pid=careful")
    browser.find_element(By.ID, "begin").click()
    wait_for(browser, lambda: browser.find_element(By.ID, "upload-status").text == "Your answers were already sent.")
    assert len(receiver[1]) == 2
    answers = pd.read_csv(downloads[0], dtype={"image_id": str})
    assert list(answers["trial"]) == list(range(1, len(key) + 1)) and list(answers["image_id"]) == careful

    # A model whose predictions are right on even test indices.
    test = load_split(cifar_npz, "test")
    labels = test.labels.numpy()
    predictions = tmp_path / "predictions.csv"
    pd.DataFrame({"index": test.index, "label": labels, "prediction": np.where(test.index % 2 == 0, labels, (labels + 1) % 10),
                  "confidence": 0.9, "label_probability": 0.5}).to_csv(predictions, index=False)
    out = {name: tmp_path / name for name in ("table.csv", "participants.csv", "figure.png", "figure.pdf")}
    assert main(["humaneval", "score", "--key", str(study["key"]), "--data", str(cifar_npz),
                 "--responses", *map(str, downloads), "--attention-threshold", "0.8",
                 "--model-predictions", *(f"tiny-s0:{c}={predictions}" for c in CONDITIONS),
                 "--table", str(out["table.csv"]), "--participants", str(out["participants.csv"]),
                 "--figure", str(tmp_path / "figure")]) == 0

    people = pd.read_csv(out["participants.csv"]).set_index("participant_id")
    assert people.loc["careful", "included"] and people.loc["careful", "attention_accuracy"] == 1.0
    assert not people.loc["careless", "included"] and "below 0.8" in people.loc["careless", "reason"]

    table = pd.read_csv(out["table.csv"]).set_index(["rater", "condition"])
    for condition, (correct, n) in expected_counts("careful", careful, key).items():
        row = table.loc[("humans", condition)]
        assert (row["correct"], row["answers"], row["participants"]) == (correct, n, 1)
        assert row["accuracy"] == pytest.approx(correct / n)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson(correct, n))
        items = key[key["condition"] == condition]
        model_correct = int((items["source_index"] % 2 == 0).sum())
        assert table.loc[("tiny-s0", condition), "correct"] == model_correct
        assert table.loc[("tiny-s0", condition), "accuracy"] == pytest.approx(model_correct / len(items))
    assert table.loc[("humans", "bs"), "keep_fraction"] == pytest.approx(52 / 1024, abs=1e-6)
    for name in ("figure.png", "figure.pdf"):
        assert out[name].stat().st_size > 5000
    with Image.open(out["figure.png"]) as figure:
        assert figure.width > 500


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out independently of the package's."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_matches_the_formula():
    for k, n in ((0, 10), (3, 10), (10, 10), (52, 100)):
        assert wilson_interval(k, n) == pytest.approx(wilson(k, n))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


# --------------------------------------------------------------------------------- response validation
def write_responses(path: Path, rows: list[list], header=("study", "participant_id", "trial", "image_id", "response")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def good_rows(key: pd.DataFrame, participant: str = "p1") -> list[list]:
    return [[r.study, participant, t, r.image_id, r.class_name] for t, r in enumerate(key.itertuples(), 1)]


@pytest.mark.parametrize("damage, message", [
    (lambda rows, key: rows.__setitem__(4, rows[4][:3] + ["0123456789abcdef", rows[4][4]]), r":6: unknown image id '0123456789abcdef'"),
    (lambda rows, key: rows.__setitem__(2, rows[2][:4] + ["Cat"]), r":4: unknown class name 'Cat'"),
    (lambda rows, key: rows.append(list(rows[9])), r":52: participant 'p1' answered image \w+ a second time \(first at .*:11\)"),
    (lambda rows, key: rows.__setitem__(0, rows[0][:4]), r":2: malformed row with 4 fields, the header has 5"),
    (lambda rows, key: rows.__setitem__(3, ["other", *rows[3][1:]]), r":5: answers study 'other'"),
    (lambda rows, key: rows.__setitem__(5, rows[5][:2] + ["x"] + rows[5][3:]), r":7: trial 'x' is not a number"),
    (lambda rows, key: rows.__setitem__(6, [rows[6][0], " ", *rows[6][2:]]), r":8: empty participant_id"),
    (lambda rows, key: rows.__setitem__(7, [rows[7][0], "p" * 5000, *rows[7][2:]]), r":9: field 2 is 5000 characters long"),
])
def test_bad_response_files_name_the_file_and_line(study, cifar_npz, tmp_path, damage, message):
    key = read_key(study["key"])
    rows = good_rows(key)
    damage(rows, key)
    path = write_responses(tmp_path / "bad.csv", rows)
    classes = load_split(cifar_npz, "test", 10).classes
    outputs = [str(tmp_path / n) for n in ("t.csv", "p.csv", "f")]
    with pytest.raises(ResponseError, match=re.escape(str(path)) + message):
        score(str(study["key"]), [str(path)], classes, 0.8, [], *outputs)


def test_non_utf8_and_huge_fields_name_the_file_and_line(study, cifar_npz, tmp_path):
    key = read_key(study["key"])
    classes = load_split(cifar_npz, "test", 10).classes
    outputs = [str(tmp_path / n) for n in ("t.csv", "p.csv", "f")]
    good = write_responses(tmp_path / "latin1.csv", good_rows(key, participant="p1")).read_bytes().splitlines(True)
    good[3] = good[3].replace(b"p1", "pé".encode("latin-1"))  # one participant id written in Latin-1
    (tmp_path / "latin1.csv").write_bytes(b"".join(good))
    with pytest.raises(ResponseError, match=r"latin1\.csv:4: not UTF-8 text \(byte 0xe9"):
        score(str(study["key"]), [str(tmp_path / "latin1.csv")], classes, 0.8, [], *outputs)
    lines = (tmp_path / "latin1.csv").read_bytes().splitlines(True)
    lines[2] = b'"' + b"x" * 200_000 + b'"\n'  # beyond the csv module's own field limit
    (tmp_path / "huge.csv").write_bytes(b"".join(lines[:3]))
    with pytest.raises(ResponseError, match=r"huge\.csv:3: unreadable CSV \(field larger than field limit"):
        score(str(study["key"]), [str(tmp_path / "huge.csv")], classes, 0.8, [], *outputs)


def test_participant_ids_cannot_inject_spreadsheet_formulas(study, cifar_npz, tmp_path):
    key = read_key(study["key"])
    classes = load_split(cifar_npz, "test", 10).classes
    outputs = [tmp_path / n for n in ("t.csv", "p.csv", "f")]
    evil = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\t=cmd|' /C calc'!A0"]
    files = [write_responses(tmp_path / f"r{i}.csv", good_rows(key, participant=pid)) for i, pid in enumerate(evil)]
    score(str(study["key"]), list(map(str, files)), classes, 0.8, [], *map(str, outputs))
    with open(outputs[1], newline="") as handle:
        ids = [row["participant_id"] for row in csv.DictReader(handle)]
    assert sorted(ids) == sorted("'" + pid.strip() for pid in evil)  # ids are compared stripped
    cells = pd.DataFrame({"text": ["\tx", "\rx", "ok", "-", None], "n": [-1, 2, 3, 4, 5]})
    assert neutralize_formulas(cells)["text"].tolist()[:4] == ["'\tx", "'\rx", "ok", "'-"]
    assert neutralize_formulas(cells)["n"].tolist() == [-1, 2, 3, 4, 5]  # numbers stay numbers
    for path in outputs[:2]:
        with open(path, newline="") as handle:
            cells = [cell for row in csv.reader(handle) for cell in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or c.startswith("-") and not is_number(c)]


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_missing_columns_empty_files_and_duplicates_across_files_are_errors(study, cifar_npz, tmp_path):
    key = read_key(study["key"])
    classes = load_split(cifar_npz, "test", 10).classes
    outputs = [str(tmp_path / n) for n in ("t.csv", "p.csv", "f")]
    no_response = write_responses(tmp_path / "a.csv", [r[:4] for r in good_rows(key)], header=("study", "participant_id", "trial", "image_id"))
    with pytest.raises(ResponseError, match=r"a\.csv:1: header lacks the column\(s\) response"):
        score(str(study["key"]), [str(no_response)], classes, 0.8, [], *outputs)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ResponseError, match=r"empty\.csv: the file is empty"):
        score(str(study["key"]), [str(tmp_path / "empty.csv")], classes, 0.8, [], *outputs)
    first = write_responses(tmp_path / "first.csv", good_rows(key)[:5])
    second = write_responses(tmp_path / "second.csv", good_rows(key)[4:])
    with pytest.raises(ResponseError, match=r"second\.csv:2: .* a second time \(first at .*first\.csv:6\)"):
        score(str(study["key"]), [str(first), str(second)], classes, 0.8, [], *outputs)


def test_all_participants_excluded_and_mismatched_predictions_are_errors(study, cifar_npz, tmp_path):
    key = read_key(study["key"])
    classes = load_split(cifar_npz, "test", 10).classes
    outputs = [str(tmp_path / n) for n in ("t.csv", "p.csv", "f")]
    rows = good_rows(key)
    for row, cls in zip(rows, key["label"]):
        row[4] = classes[(cls + 1) % 10]
    careless = write_responses(tmp_path / "careless.csv", rows)
    with pytest.raises(ValueError, match=r"all 1 participants fail the attention checks .*\(p1: attention-check accuracy 0\.000 below 0\.5\)"):
        score(str(study["key"]), [str(careless)], classes, 0.5, [], *outputs)
    assert not pd.read_csv(outputs[1])["included"].any()  # the exclusions are still reported

    good = write_responses(tmp_path / "good.csv", good_rows(key))
    partial = tmp_path / "partial.csv"
    pd.DataFrame({"index": [0, 1], "label": [0, 0], "prediction": [0, 0]}).to_csv(partial, index=False)
    with pytest.raises(ValueError, match=r"partial\.csv has no predictions for 20 of the study's bs images"):
        score(str(study["key"]), [str(good)], classes, 0.5, [f"m:bs={partial}"], *outputs)
    with pytest.raises(ValueError, match="expected NAME:CONDITION=CSV"):
        score(str(study["key"]), [str(good)], classes, 0.5, [f"m:unknown={partial}"], *outputs)


# ----------------------------------------------------------------------------------------- the workflow
@pytest.mark.slow
def test_workflow_builds_the_study_and_scores_the_responses_put_beside_it(smoke_run, tmp_path):
    from conftest import REPO, snakemake

    built = smoke_run / "results/humaneval"
    assert {p.name for p in (built / "study").iterdir()} == {"index.html", "study.js", "study.css", "study-data.js", "images"}
    key = read_key(built / "answer_key.csv")
    assert key.groupby("condition").size().to_dict() == {"bs": 20, "random": 20, "full": 10}  # config/smoke.yaml
    assert set(key["masks"]) == {"results/subsets/tiny-s0/gradient/bs-0.05.npz", "results/subsets/random-0.05.npz", ""}

    # A copy of the finished run (timestamps kept), so the shared run stays as it is.
    work = tmp_path / "run"
    shutil.copytree(smoke_run, work)
    responses = work / "data/humaneval/responses"
    responses.mkdir(parents=True)
    write_responses(responses / "p1.csv", good_rows(key))
    result = snakemake(work, "--cores", "2", configfiles=(REPO / "config/smoke.yaml", work / "source.yaml"))
    ran = set(re.findall(r"^(?:local)?rule (\w+):", result.stderr, re.M)) - {"all"}
    assert ran == {"humaneval_score"}  # nothing else reran
    table = pd.read_csv(work / "results/tables/humaneval.csv")
    humans = table[table["rater"] == "humans"].set_index("condition")
    assert humans["accuracy"].to_dict() == {"bs": 1.0, "random": 1.0, "full": 1.0}
    models = table[table["kind"] == "model"]
    assert set(zip(models["rater"], models["condition"])) == {("tiny-s0", c) for c in CONDITIONS} | {
        (f"tiny-s0 retrained on the subsets, seed {s}", c) for s in (0, 1) for c in ("bs", "random")}
    assert (work / "results/figures/humaneval.pdf").stat().st_size > 5000
