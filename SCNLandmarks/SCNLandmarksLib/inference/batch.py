"""Detecting landmarks on many images: one ``.mrk.json`` per image and a CSV summary."""

from __future__ import annotations

import csv
import io
import logging
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..common.atomic import atomic_write_text, file_lock, make_output_folder
from .detection import Detector
from ..imaging.image_io import (IMAGE_SUFFIXES, check_fits_in_memory, find_images, is_photo_file,  # some re-exported
                                output_stem, read_image)
from ..data.landmark_io import merge_detection_summary_csv, write_mrk_json
from ..data.landmarks import Landmarks
from ..models.model import LandmarkModel
from ..common.progress import Progress, ProgressCallback, estimate_eta
from ..models.quality import LOW_CONFIDENCE, rank_for_review

__all__ = ["BatchItem", "BatchReport", "detect_files", "detect_folder", "find_images", "output_name_clashes", "output_stem"]

log = logging.getLogger(__name__)

SUMMARY_NAME = "landmarks.csv"
REVIEW_NAME = "review_order.csv"


@dataclass
class BatchItem:
    """The outcome for one image: its landmarks and file, or the reason it failed (``skipped``: it
    was not detected because its results are there from an earlier run and are kept); ``warning``, a
    sentence for the user where the result is doubtful as a whole (see ``Detector.last_warning``)."""

    image: Path
    output: Path | None = None
    landmarks: Landmarks | None = None
    error: str | None = None
    seconds: float = 0.0
    warning: str | None = None
    skipped: bool = False


@dataclass
class BatchReport:
    """All outcomes of a batch run."""

    items: list[BatchItem] = field(default_factory=list)
    summary_csv: Path | None = None
    device: str = ""
    review_order: list[tuple[str, float, int]] = field(default_factory=list)
    review_csv: Path | None = None

    @property
    def failed(self) -> list[BatchItem]:
        return [item for item in self.items if item.error is not None]

    @property
    def succeeded(self) -> list[BatchItem]:
        return [item for item in self.items if item.error is None]

    @property
    def warned(self) -> list[BatchItem]:
        return [item for item in self.items if item.error is None and item.warning is not None]


def detect_files(
    images: Sequence[str | Path],
    output_folder: str | Path,
    model: LandmarkModel | str | Path,
    *,
    device: str | torch.device = "auto",
    spacing: Sequence[float] | None = None,
    photo_spacing: float | None = None,
    low_confidence_threshold: float | None = LOW_CONFIDENCE,
    check_above_mm: float | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_item: Callable[[BatchItem], None] | None = None,
) -> BatchReport:
    """Detect landmarks on each image; a bad image is reported and skipped, the rest go on.

    Args:
        images: image files (or DICOM folders).
        output_folder: receives ``<image name>.mrk.json`` per image and ``landmarks.csv`` (rows
            of earlier runs into the same folder are kept; an image detected again replaces its rows);
            with expected errors for more than one image there, also ``review_order.csv``: all
            the folder's images ranked for review, the one expected furthest off first, with any
            warning (see :func:`update_review_order_csv`).
        model: model file or loaded model.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        spacing: pixel size in mm for every image (see :func:`read_image`: it replaces a header's).
        photo_spacing: pixel size in mm of the images whose files carry none (PNG, JPEG, BMP,
            TIFF; read at 1 mm otherwise); the others keep their own.
        low_confidence_threshold: for a model without an error model, points below this
            confidence are to be checked (None: none).
        check_above_mm: points whose expected error exceeds this (mm) are to be checked
            (default: the model's validated threshold).
        overwrite: replace existing output files (by default an image whose ``.mrk.json`` exists is
            skipped, before its detection, with a message that says so).
        progress: called after each image.
        should_cancel: polled between images; the images done so far are kept.
        on_item: called with each finished item (for live display).
    """
    output_folder = make_output_folder(output_folder)  # its problems are found before any image is processed
    detector = Detector(model, device=device, check_above_mm=check_above_mm,
                        low_confidence=-1.0 if low_confidence_threshold is None else low_confidence_threshold)
    report = BatchReport(device=detector.device_description)
    started = time.monotonic()
    total = len(images)
    written: dict[str, Path] = {}  # this run's outputs: two images named alike must not share one
    for number, image_path in enumerate(images):
        if should_cancel is not None and should_cancel():
            log.info("Batch cancelled after %d of %d images", number, total)
            break
        image_path = Path(image_path)
        item = BatchItem(image=image_path)
        began = time.monotonic()
        target = output_folder / f"{output_stem(image_path)}.mrk.json"
        try:
            if _name_key(target) in written:
                msg = (f"{image_path.name} has the same name as {written[_name_key(target)].name}, whose results are in "
                       f"{target} already; rename one of them")
                raise FileExistsError(msg)
            if target.exists() and not overwrite:  # found before the network runs, not after
                item.skipped = True
                msg = (f"{target} exists from an earlier run and is kept; to replace earlier results, ask for it "
                       "(--overwrite, overwrite=True, or 'Replace earlier results' in Slicer), or choose another output folder")
                raise FileExistsError(msg)
            check_fits_in_memory(image_path)
            pixels = spacing if spacing is not None else photo_spacing if is_photo_file(image_path) else None
            landmarks = detector.detect(read_image(image_path, spacing=pixels))
            item.warning = detector.last_warning
            write_mrk_json(landmarks, target, node_name=output_stem(image_path),
                           low_confidence_threshold=low_confidence_threshold, overwrite=overwrite)
            item.output, item.landmarks = target, landmarks
            written[_name_key(target)] = image_path
        except MemoryError as error:
            item.error = (str(error) or "not enough memory to process this image") + "; it was skipped"
            log.info("Skipped %s: %s", image_path.name, item.error)  # in the report; the callers show it
        except (ValueError, OSError, RuntimeError) as error:
            item.error = str(error)
            log.info("Skipped %s: %s", image_path.name, error)
        item.seconds = time.monotonic() - began
        report.items.append(item)
        if on_item is not None:
            on_item(item)
        if progress is not None:
            elapsed = time.monotonic() - started
            progress(Progress("detect", number + 1, total, elapsed, estimate_eta(number + 1, total, elapsed),
                              message=image_path.name + (" skipped" if item.skipped else " failed" if item.error else "")))
    results = [(output_stem(item.image), item.landmarks) for item in report.succeeded if item.landmarks is not None]
    if results:
        # Earlier runs into this folder keep their rows: the summary is merged, never replaced.
        report.summary_csv = merge_detection_summary_csv(results, output_folder / SUMMARY_NAME)
        warnings = {output_stem(item.image): item.warning for item in report.succeeded}
        report.review_order, report.review_csv = update_review_order_csv(
            report.summary_csv, output_folder / REVIEW_NAME, warnings=warnings)
    return report


def _name_key(path: Path) -> str:
    """A file name as the file systems of macOS and Windows compare them: case and Unicode form ignored."""
    return unicodedata.normalize("NFC", str(path)).casefold()


def output_name_clashes(images: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pairs of images whose results would be saved under one name (``scan.jpg`` and ``scan.png``,
    or ``a.jpg`` and ``A.jpg`` on macOS and Windows), found before any is detected, so that shards
    of a job array, which each see only their share, cannot skip or replace one of them."""
    first: dict[str, Path] = {}
    clashes = []
    for image in images:
        key = _name_key(Path(output_stem(Path(image))))
        if key in first:
            clashes.append((first[key], Path(image)))
        else:
            first[key] = Path(image)
    return clashes


def update_review_order_csv(
    summary_csv: Path, path: Path, *, warnings: Mapping[str, str | None]
) -> tuple[list[tuple[str, float, int]], Path | None]:
    """Rank every image of a folder's ``landmarks.csv`` for review and write ``review_order.csv``.

    Columns ``image,rank,mean_expected_error_mm,points_to_check,warning``, the first row the first
    to review (see :func:`~SCNLandmarksLib.models.quality.rank_for_review`). All images of the
    summary are ranked, so runs into the same folder one after another, or as shards at the same
    time, end with one ranking of them all. ``warnings`` holds this run's images (None: no warning);
    the other images keep the warning the previous ranking gave them.

    Returns:
        The ranking, and the file; the file is not written (None) unless at least two images
        are ranked and some have expected errors, or an image has a warning (kept so for the
        next run, a shard of one image included).
    """
    with file_lock(summary_csv):  # the summary read whole, and rankings written one after another
        with open(summary_csv, newline="", encoding="utf-8") as stream:
            points = list(csv.DictReader(stream))
        per_image: dict[str, tuple[list[float], int]] = {}
        for point in points:
            expected, checks = per_image.setdefault(point["image"], ([], 0))
            if point["expected_error_mm"] and point["missing"] != "true":
                expected.append(float(point["expected_error_mm"]))
            per_image[point["image"]] = (expected, checks + (point["check"] == "true"))
        order = rank_for_review((image, float(np.mean(expected)) if expected else float("nan"), checks)
                                for image, (expected, checks) in per_image.items())
        earlier = _earlier_warnings(path)
        kept = {image: warnings[image] if image in warnings else earlier.get(image) for image, _, _ in order}
        ranked = len(order) >= 2 and any(np.isfinite(expected) for _, expected, _ in order)
        if not ranked and not any(kept.values()):
            return order, None
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "mean_expected_error_mm", "points_to_check", "warning"])
        for rank, (image, expected, checks) in enumerate(order, start=1):
            writer.writerow([image, rank, f"{expected:.2f}" if np.isfinite(expected) else "", checks, kept[image] or ""])
        return order, atomic_write_text(path, buffer.getvalue(), overwrite=True)


def _earlier_warnings(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            return {row["image"]: row["warning"] for row in csv.DictReader(stream) if row.get("warning")}
    except (OSError, KeyError, csv.Error):
        return {}  # no earlier ranking, or one of a version without warnings


def detect_folder(
    input_folder: str | Path,
    output_folder: str | Path,
    model: LandmarkModel | str | Path,
    **options: object,
) -> BatchReport:
    """:func:`detect_files` on every image of ``input_folder`` (see :func:`find_images`)."""
    images = find_images(input_folder)
    if not images:
        msg = f"No images found in {input_folder} (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM folders)"
        raise ValueError(msg)
    return detect_files(images, output_folder, model, **options)  # type: ignore[arg-type]
