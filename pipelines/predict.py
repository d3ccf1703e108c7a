"""Segment raw images with a trained run: ``python -m pipelines.predict RUN_DIR INPUT OUT``.

INPUT is a folder in any supported layout (labels, if present, are ignored)
or a single image file.  For every input frame the run's own plan
(``RUN_DIR/plan.json``: reorientation, in-plane resampling, normalization,
crop size) is applied exactly, the network segments the crop, and the result
is put back through the inverse crop, resampling and reorientation into a
label NIfTI with exactly the input's shape and affine (DICOM inputs too), named after the input
(``patient001_frame01.nii.gz`` -> ``OUT/patient001/patient001_frame01_pred.nii.gz``;
a frame ``t`` of a 4D file gets ``_frameTT``).  Label values are the run's class
indices ``0..C-1`` in the order of ``plan.classes`` (recorded as ``classes`` in
``predict_report.json``; ACDC's 0-3 = background, RV, MYO, LV for the default classes).

Heart localisation without labels, in order:

1. the temporal first harmonic of the 4D cine (:func:`cmrprep.localize.center_from_cine`)
   when the case has one;
2. otherwise, for a case with two or more frames on one grid (ED and ES), the same
   harmonic of those frames -- for two frames ``|ED - ES|``, the contraction
   (:func:`frames_center`);
3. otherwise (a single 3D image) a coarse pass of the network itself over the whole
   field of view (sliding 50 %-overlapping windows over the middle slices at the
   plan spacing); of the blobs of predicted foreground, the one whose *smallest*
   class mass (RV, myocardium, LV) is largest is taken as the heart
   (:func:`heart_blob`), and the centre is its probability-weighted centroid.  If
   the network sees no foreground, the field-of-view centre is used (logged).

Without a cine (2 and 3), the crop is then re-centred on the heart segmented there,
up to :data:`REFINE_STEPS` times, so the final crop sits where the training crops did.
Single-frame inputs rely on the network alone and are the least reliable: with a
weaker model (validation Dice 0.96) the coarse pass locked onto a heart-like
structure elsewhere in the field of view in 1 synthetic case of 10; with the
default model none did (``benchmarks/predict_accuracy.py``).  Check
``predict_report.json`` (centre source and position per frame).

The segmentation keeps only the largest 3D-connected foreground component
(:mod:`cmrprep.postprocess`; ``--no-postprocess`` turns it off).

The training crops were jittered by up to ``plan.crop_jitter_mm`` around the
heart so the network tolerates the residual centre error.  Inputs are never
overwritten; a failing case is reported and the others continue.
After segmentation every case is checked for plausibility (:mod:`cmrprep.plausibility`:
non-CMR input, empty or missing classes, LV/RV volumes, myocardial mass or EF outside
physiological ranges, a heart touching the crop border, low localisation confidence);
flags and the measured volumes are in ``predict_report.json`` and the log, and the
predictions are written all the same.  The inputs are also compared with the training
data (``RUN_DIR/training_fingerprint.json``, :mod:`cmrprep.shift`): spacing, slice
thickness, field of view, intensity distribution shape, blood-myocardium contrast (of the
prediction) and storage orientation outside the training ranges are named warnings
(``shift`` in the report).
Exit codes: 0 ok, 3 some cases failed or were flagged, 2 configuration error, 1 failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.cases import CaseError, CaseSpec, Problem
from cmrprep.geometry import Geometry
from cmrprep.plan import ConfigError, Plan
from pipelines.exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_QUARANTINE, help_formatter, plain_text
from pipelines.ingest.options import DiscoveryOptions, add_discovery_arguments

log = logging.getLogger("pipelines.predict")


@dataclass
class PredictResult:
    """Files written and cases that failed."""

    written: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    centres: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Plausibility flags per case (:mod:`cmrprep.plausibility`); a flagged case's files are written.
    flags: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Volumes measured on each case's prediction (EDV, ESV, EF, myocardial mass).
    measures: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Dataset-shift warnings: inputs outside the training data's ranges (:mod:`cmrprep.shift`).
    shift: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINE if self.failed or any(self.flags.values()) else EXIT_OK


def load_run(run_dir: str | Path):
    """Load ``(model, plan)`` from a training run directory."""
    from model.saving import load_model_file

    run = Path(run_dir)
    ckpt = run / "best.keras"
    if not ckpt.exists():
        raise ConfigError(f"no trained model at {ckpt}; train with `python -m pipelines.train`")
    plan_path = run / "plan.json"
    if not plan_path.exists():
        raise ConfigError(f"{plan_path} is missing; the run must carry the plan it was trained on")
    try:
        plan = Plan.from_json(plan_path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"cannot read the run's plan {plan_path} ({type(exc).__name__}: {exc}); "
                          "it is corrupt: copy the run folder again or re-run the training.") from exc
    return load_model_file(ckpt), plan


def softmax_probs(net, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities ``(N, H, W, C)`` for ``x`` of shape ``(N, H, W)``."""
    out = np.asarray(net.predict(x[..., None].astype(np.float32), batch_size=batch_size, verbose=0))
    if not np.allclose(out.sum(axis=-1)[:1], 1.0, atol=1e-3) or out.min() < 0:
        out = out - out.max(axis=-1, keepdims=True)
        out = np.exp(out)
        out /= out.sum(axis=-1, keepdims=True)
    return out


def coarse_center(net, image: np.ndarray, geometry: Geometry, plan: Plan,
                  batch_size: int = 32) -> np.ndarray | None:
    """World (RAS mm) heart centre from a sliding-window pass over the whole field of view."""
    from cmrprep.preprocess import preprocess_frame

    spacing = plan.target_spacing
    extent = [geometry.shape[a] * geometry.spacing[a] / spacing for a in (0, 1)]
    win = plan.crop_shape
    big = tuple(int(math.ceil(max(e, w) / (w // 2)) * (w // 2)) for e, w in zip(extent, win))
    prepared = preprocess_frame(image, None, geometry, Plan.from_dict({**plan.to_dict(),
                                                                       "crop_shape": list(big)}))
    vol = prepared.images  # (S, H, W) covering the whole FOV, centred on it
    s = vol.shape[0]
    mid = vol[s // 3: max(s // 3 + 1, 2 * s // 3)]
    classes = np.zeros((*big, plan.num_classes - 1), dtype=np.float64)
    hits = np.zeros(big, dtype=np.float64)
    for i0 in range(0, big[0] - win[0] + 1, win[0] // 2):
        for j0 in range(0, big[1] - win[1] + 1, win[1] // 2):
            p = softmax_probs(net, mid[:, i0:i0 + win[0], j0:j0 + win[1]], batch_size)
            classes[i0:i0 + win[0], j0:j0 + win[1]] += p[..., 1:].sum(axis=0)
            hits[i0:i0 + win[0], j0:j0 + win[1]] += len(mid)
    classes = classes / np.maximum(hits, 1)[..., None]
    fg = heart_blob(classes)
    if fg.sum() <= 0:
        return None
    ii, jj = np.indices(big)
    ci, cj = (ii * fg).sum() / fg.sum(), (jj * fg).sum() / fg.sum()
    box = prepared.record["crop_box"]["start"]
    geo_r = Geometry.from_dict(prepared.record["resampled_geometry"])
    return geo_r.voxel_to_world([ci + box[0], cj + box[1], (geo_r.shape[2] - 1) / 2])


def heart_blob(classes: np.ndarray) -> np.ndarray:
    """Foreground probability of the most heart-like blob of a coarse class map.

    ``classes`` is ``(H, W, C-1)``, the mean foreground class probabilities.
    Blobs are the connected regions where the foreground probability exceeds
    0.5; each is scored by its *smallest* per-class probability mass, so the
    heart (RV, myocardium and LV together) beats a false positive elsewhere in
    the field of view (a bright aorta or atrium called LV, a dark wall called
    myocardium), which the network, trained on heart-centred crops, never saw.
    Returns an ``(H, W)`` map, zero outside the chosen blob (all zero if none).
    """
    from scipy import ndimage

    fg = classes.sum(axis=-1)
    comps, n = ndimage.label(fg > 0.5)
    if n == 0:
        return np.zeros_like(fg)
    index = np.arange(1, n + 1)
    mass = np.stack([ndimage.sum_labels(classes[..., c], comps, index=index)
                     for c in range(classes.shape[-1])], axis=-1)
    best = int(np.argmax(mass.min(axis=-1))) + 1
    return np.where(comps == best, fg, 0)


def label_center(label: np.ndarray, geometry: Geometry) -> np.ndarray | None:
    """World (RAS mm) centroid of a predicted label's foreground, ``None`` if empty."""
    idx = np.argwhere(label > 0)
    if idx.size == 0:
        return None
    return geometry.voxel_to_world(idx.mean(axis=0))


def frames_center(volumes: list[tuple[np.ndarray, Geometry]]) -> np.ndarray | None:
    """World heart centre from the motion between a case's frames (ED and ES), if possible.

    Needs at least two frames on the same grid; their first temporal harmonic
    (for two frames ``|ED - ES|``) marks the contracting heart
    (:func:`cmrprep.localize.center_from_cine`).  ``None`` otherwise.
    """
    from cmrprep.localize import center_from_cine

    if len(volumes) < 2:
        return None
    geom = volumes[0][1]
    same = [img for img, g in volumes if img.shape == volumes[0][0].shape
            and g.max_affine_difference(geom) <= 1e-3]
    if len(same) < 2:
        return None
    ci, cj = center_from_cine(np.stack(same, axis=-1), geom)
    return geom.voxel_to_world([ci, cj, (geom.shape[2] - 1) / 2])


def _cine_center(case: CaseSpec) -> np.ndarray | None:
    from cmrprep.localize import center_from_cine
    from pipelines.ingest import load_cine

    loaded = load_cine(case)
    if loaded is None:
        return None
    cine, geom = loaded
    ci, cj = center_from_cine(cine, geom)
    return geom.voxel_to_world([ci, cj, (geom.shape[2] - 1) / 2])


@dataclass
class Segmentation:
    """One segmented frame: the label in the input geometry, the preprocessing record, the crop's prediction."""

    label: np.ndarray
    record: dict
    crop: np.ndarray  # (S, H, W) class indices on the network's crop


def segment_frame(net, image: np.ndarray, geometry: Geometry, plan: Plan,
                  center: np.ndarray | None, batch_size: int = 32,
                  postprocess: bool = True) -> Segmentation:
    """Label map in the input geometry, the preprocessing record used and the crop's prediction.

    With ``postprocess`` only the largest connected foreground component is kept
    (:func:`cmrprep.postprocess.largest_foreground_component`).
    """
    from cmrprep.postprocess import largest_foreground_component
    from cmrprep.preprocess import preprocess_frame, restore_prediction

    prepared = preprocess_frame(image, None, geometry, plan, center=center)
    probs = softmax_probs(net, prepared.images.astype(np.float32), batch_size)
    pred = np.argmax(probs, axis=-1).astype(np.uint8)
    if postprocess:
        pred = np.moveaxis(largest_foreground_component(np.moveaxis(pred, 0, 2)), 2, 0)
    return Segmentation(restore_prediction(pred, prepared.record), prepared.record, pred)


def _write_label(path: Path, label: np.ndarray, source: str, geometry: Geometry) -> None:
    import nibabel as nib

    header = None
    affine = geometry.matrix
    if source.lower().endswith((".nii", ".nii.gz")):
        src = nib.load(source)
        header = src.header.copy()
        affine = src.affine
        header.set_data_shape(label.shape)
    img = nib.Nifti1Image(label.astype(np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    tmp = path.with_name(path.name.replace(".nii.gz", ".tmp.nii.gz"))
    nib.save(img, tmp)
    tmp.replace(path)


@dataclass
class CaseOutcome:
    """What :func:`predict_case` did for one case."""

    written: list[str]
    centres: dict[str, Any]
    flags: list[dict[str, Any]]  # plausibility flags (cmrprep.plausibility)
    measures: dict[str, float]  # volumes measured on the prediction
    features: list[dict[str, Any]]  # shift features of the input frames (cmrprep.shift)


def predict_case(net, case: CaseSpec, plan: Plan, out: Path, inputs: set[str],
                 batch_size: int = 32, postprocess: bool = True) -> CaseOutcome:
    """Segment every frame of one case: files written, centres, flags, volumes, shift features."""
    from cmrprep import plausibility
    from cmrprep.shift import frame_features
    from pipelines.evaluate import prediction_name
    from pipelines.ingest import read_volume
    from pipelines.ingest.validate import check_intensities

    center = _cine_center(case)
    source = "cine_first_harmonic" if center is not None else None
    volumes = [read_volume(f.image, case_id=case.case_id, frame=f.image_frame) for f in case.frames]
    for frame, (image, _) in zip(case.frames, volumes):
        problems = check_intensities(image, case.case_id, frame.image)
        if problems:  # NaN or constant: the network's answer would be meaningless
            raise CaseError(problems[0])
    if center is None:
        center = frames_center(volumes)
        source = "ed_es_difference" if center is not None else None
    written, frame_centres = [], []
    flags = plausibility.input_flags(volumes[0][1].shape, volumes[0][1].spacing)
    labels, spacings, features = {}, {}, []
    for frame, (image, geom) in zip(case.frames, volumes):
        c = center
        if c is None:
            c = coarse_center(net, image, geom, plan, batch_size)
            source = "coarse_network" if c is not None else "fov_centre"
        seg = segment_frame(net, image, geom, plan, c, batch_size, postprocess)
        heart = label_center(seg.label, geom)  # how far the localiser was from the heart it found
        offset = float(np.linalg.norm(heart - c)) if heart is not None and c is not None else None
        seg, c = _refine(net, image, geom, plan, seg, c, batch_size, postprocess)
        label = seg.label
        frame_centres.append(None if c is None else [float(v) for v in c])
        flags += plausibility.frame_flags(label, geom.spacing, plan.classes, frame.phase)
        flags += plausibility.crop_flags(seg.crop, frame.phase, offset, source)
        labels[frame.phase], spacings[frame.phase] = label, geom.spacing
        features.append(frame_features(image, geom, label, classes=plan.classes))  # contrast: predicted
        name = prediction_name(frame.image, frame.image_frame if _is_4d(frame) else None)
        dest = out / case.case_id / name
        if str(dest.resolve()) in inputs:
            raise CaseError(Problem(case.case_id, str(dest), "output",
                                    "refusing to overwrite an input file; choose another OUT"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write_label(dest, label, frame.image, geom)
        written.append(str(dest))
    volume_flags, measures = plausibility.case_flags(labels, spacings, plan.classes)
    centres = {"source": source, "world_mm": None if center is None else list(map(float, center)),
               "frames_world_mm": frame_centres}
    return CaseOutcome(written, centres, flags + volume_flags, measures, features)


#: Re-centre until the crop centre moves less than this (mm), at most :data:`REFINE_STEPS` times.
REFINE_TOL_MM = 3.0
REFINE_STEPS = 2


def _refine(net, image, geom, plan, seg: Segmentation, center, batch_size, postprocess):
    """Re-segment with the crop centred on the previous segmentation.

    Every localiser (cine harmonic, ED-ES difference, coarse pass) finds the heart
    only to within a few centimetres on data unlike the training data (measured on
    synthetic site-B cines: 10-40 mm); centring the final crop on the heart the
    network segmented puts it where training crops were (the ground-truth centre
    with a small jitter).  A re-centred segmentation is kept only if it is at
    least as heart-like (:func:`_heart_score`: classes present, then foreground
    voxels): centring on a false positive elsewhere in the field of view can
    push the heart out of the crop (measured on synthetic site B: an ED frame
    whose crop moved 28 mm came back empty).  The localisation flag still
    reports the localiser's own error.  Returns ``(segmentation, centre)``.
    """
    for _ in range(REFINE_STEPS):
        new = label_center(seg.label, geom)
        if new is None or (center is not None and np.linalg.norm(new - center) < REFINE_TOL_MM):
            break
        again = segment_frame(net, image, geom, plan, new, batch_size, postprocess)
        if _heart_score(again.crop, plan.num_classes) < _heart_score(seg.crop, plan.num_classes):
            break  # centred on a false positive, the heart left the crop: keep the better one
        seg, center = again, new
    return seg, center


def _heart_score(crop: np.ndarray, num_classes: int) -> tuple[int, int]:
    """``(foreground classes present, foreground voxels)`` of a crop prediction: more is more heart-like."""
    from cmrprep.stats import slice_class_counts

    counts = slice_class_counts(crop, num_classes).sum(axis=0)[1:]
    return int((counts > 0).sum()), int(counts.sum())


def _is_4d(frame) -> bool:
    return frame.image_frame is not None


def predict(run_dir: str | Path, input_path: str | Path, out: str | Path, *,
            options: DiscoveryOptions | None = None, layout: str | None = None,
            batch_size: int = 32, progress: bool = True, postprocess: bool = True) -> PredictResult:
    """Segment every case under ``input_path`` into ``out`` (see the module docstring).

    ``options`` are the shared discovery options (layout, globs, patient
    pattern; labels are not read); ``layout`` alone is the short form.
    """
    from tqdm.auto import tqdm

    options = DiscoveryOptions.coerce(options, layout)
    net, plan = load_run(run_dir)
    src, out = Path(input_path), Path(out)
    if not src.exists():
        raise ConfigError(f"input {src} does not exist")
    disc = options.discover(src)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {str(Path(f.image).resolve()) for c in disc.cases for f in c.frames}
    result = PredictResult(failed=[p.to_dict() for p in disc.problems])
    features: dict[str, list[dict[str, Any]]] = {}
    for case in tqdm(disc.cases, desc="predict", unit="case", disable=not progress):
        try:
            done = predict_case(net, case, plan, out, inputs, batch_size, postprocess)
            result.written.extend(done.written)
            result.centres[case.case_id] = done.centres
            result.measures[case.case_id] = done.measures
            features[case.case_id] = done.features
            if done.flags:
                result.flags[case.case_id] = done.flags
                for f in done.flags:
                    log.warning("%s%s: %s (%s)", case.case_id, f" {f['frame']}" if f["frame"] else "",
                                f["message"], f["code"])
        except CaseError as exc:
            result.failed.append(exc.problem.to_dict())
        except Exception as exc:  # noqa: BLE001 - one bad case never stops the others
            log.exception("case %s failed", case.case_id)
            result.failed.append(Problem(case.case_id, None, "predict",
                                         f"{type(exc).__name__}: {exc}").to_dict())
    result.shift = _shift_warnings(Path(run_dir), features)
    (out / "predict_report.json").write_text(json.dumps(
        {"classes": list(plan.classes), "label_values": "class indices 0..C-1 in the order of `classes`",
         "format": "NIfTI (.nii.gz) in each input's geometry",
         "written": result.written, "failed": result.failed, "flags": result.flags, "shift": result.shift,
         "measures": result.measures, "centres": result.centres}, indent=2))
    return result


def _shift_warnings(run_dir: Path, features: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Compare the inputs with the run's ``training_fingerprint.json`` (none: nothing to compare)."""
    from cmrprep.shift import compare

    path = run_dir / "training_fingerprint.json"
    try:
        reference = json.loads(path.read_text())
    except (OSError, ValueError):
        log.info("no %s: the inputs are not compared with the training data", path)
        return []
    warnings = compare(reference, features) if features else []
    for w in warnings:
        log.warning("dataset shift: %s (%s)", w["message"], w["code"])
    return warnings


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from pipelines.backend import use_cli_default_backend

    use_cli_default_backend()  # PyTorch unless KERAS_BACKEND says otherwise
    p = argparse.ArgumentParser(prog="python -m pipelines.predict", description=plain_text(__doc__),
                                formatter_class=help_formatter())
    p.add_argument("run_dir")
    p.add_argument("input", help="folder in any supported layout, or one image file")
    p.add_argument("out")
    add_discovery_arguments(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-postprocess", action="store_true",
                   help="keep every predicted component (default: largest foreground component)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        res = predict(a.run_dir, a.input, a.out, options=DiscoveryOptions.from_args(a), batch_size=a.batch_size,
                      progress=not a.quiet, postprocess=not a.no_postprocess)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    print(f"wrote {len(res.written)} NIfTI label files (class indices, see predict_report.json) to "
          f"{a.out}; {len(res.failed)} failed; {len(res.flags)} case(s) flagged as implausible")
    for f in res.failed:
        print(f"  FAILED {f['case_id']}: {f['message']}")
    for w in res.shift:
        print(f"  SHIFT {w['message']}")
    for cid, flags in res.flags.items():
        for f in flags:
            print(f"  FLAGGED {cid}{' ' + f['frame'] if f['frame'] else ''}: {f['message']} ({f['code']})")
    return res.exit_code


if __name__ == "__main__":
    from pipelines.exitcodes import run_main

    sys.exit(run_main(main, 'interrupted; label files already written are complete'))
