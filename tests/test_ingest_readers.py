"""read_volume / read_header: formats, scaling, header checks before allocation."""

import gzip
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from cmrprep.cases import CaseError
from cmrprep.geometry import Geometry, to_sitk
from pipelines.ingest import read_cine, read_header, read_volume


def _rot_affine():
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot * [1.25, 1.25, 6.0]
    aff[:3, 3] = [-30.0, 12.0, 4.0]
    return aff


def _raw_header(path, mutate):
    raw = gzip.open(path).read()
    hdr = nib.Nifti1Header(raw[:348], check=False)
    mutate(hdr)
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + raw[348:])


def test_nifti2_round_trip(tmp_path, write_nifti, tiny):
    path = write_nifti(tmp_path / "n2.nii.gz", tiny.image(), tiny.affine, nifti2=True)
    assert nib.load(path).header.sizeof_hdr == 540
    data, geom = read_volume(path, case_id="c")
    np.testing.assert_array_equal(data, tiny.image())
    np.testing.assert_allclose(geom.matrix, tiny.affine)
    assert geom.spacing == (1.5, 1.5, 8.0)


def test_scaled_image_and_exact_labels(tmp_path, write_nifti, tiny):
    path = write_nifti(tmp_path / "s.nii.gz", tiny.image(), slope=2.0, inter=-5.0)
    data, _ = read_volume(path, case_id="c")
    np.testing.assert_allclose(data, tiny.image() * 2.0 - 5.0)
    label, _ = read_volume(write_nifti(tmp_path / "l.nii", tiny.label()), case_id="c")
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, tiny.label())


def test_4d_frame_selection(tmp_path, write_nifti, tiny):
    cine = np.stack([tiny.image(t) for t in range(4)], axis=-1)
    path = write_nifti(tmp_path / "cine.nii.gz", cine)
    data, geom = read_volume(path, case_id="c", frame=2)
    np.testing.assert_array_equal(data, tiny.image(2))
    assert geom.shape == tiny.shape
    with pytest.raises(CaseError, match="choose a frame"):
        read_volume(path, case_id="c")
    with pytest.raises(CaseError, match=r"frame 4 out of range for 4 time points") as err:
        read_volume(path, case_id="c", frame=4)
    assert err.value.problem.check == "frame"


def _write_dicom_series(folder, data, geom):
    """One file per slice with position/orientation/spacing tags (SimpleITK example)."""
    folder.mkdir()
    vol = to_sitk(data, geom)
    direction = vol.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        tags = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.41",
                "0020|000e": series_uid, "0008|0018": f"{series_uid}.{k + 1}",
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{v:.6f}" for v in direction[0:7:3] + direction[1:8:3]),
                "0028|0030": f"{vol.GetSpacing()[1]:.6f}\\{vol.GetSpacing()[0]:.6f}",
                "0018|0050": f"{vol.GetSpacing()[2]:.6f}"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_geometry(tmp_path, tiny):
    geom = Geometry.from_affine(_rot_affine(), tiny.shape)
    _write_dicom_series(tmp_path / "series", tiny.image(), geom)
    data, got = read_volume(tmp_path / "series", case_id="dcm")
    np.testing.assert_array_equal(data, tiny.image())
    np.testing.assert_allclose(got.matrix, geom.matrix, atol=1e-4)
    assert read_header(tmp_path / "series", case_id="dcm").shape == tiny.shape


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".mhd"])
def test_sitk_formats_geometry(tmp_path, tiny, ext):
    geom = Geometry.from_affine(_rot_affine(), tiny.shape)
    path = tmp_path / f"vol{ext}"
    sitk.WriteImage(to_sitk(tiny.image(), geom), str(path))
    assert np.allclose(read_header(path, case_id="c").geometry.matrix, geom.matrix)
    data, got = read_volume(path, case_id="c")
    np.testing.assert_array_equal(data, tiny.image())
    np.testing.assert_allclose(got.matrix, geom.matrix, atol=1e-6)


def test_sitk_4d_frame(tmp_path, tiny):
    cine = np.stack([tiny.image(t) for t in range(3)], axis=0)  # sitk order [t, k, j, i]
    img = sitk.GetImageFromArray(np.transpose(cine, (0, 3, 2, 1)), isVector=False)
    sitk.WriteImage(img, str(tmp_path / "c.mha"))
    data, geom = read_volume(tmp_path / "c.mha", case_id="c", frame=1)
    np.testing.assert_array_equal(data, tiny.image(1))
    assert geom.shape == tiny.shape
    whole, _ = read_cine(tmp_path / "c.mha", case_id="c")
    np.testing.assert_array_equal(whole[..., 2], tiny.image(2))


def test_header_bomb_refused_without_allocating(tmp_path, write_nifti, tiny):
    path = write_nifti(tmp_path / "bomb.nii.gz", tiny.image())
    _raw_header(path, lambda h: h["dim"].__setitem__(slice(0, 4), [3, 10_000, 10_000, 1_000]))
    assert path.stat().st_size < 10_000
    tracemalloc.start()
    try:
        with pytest.raises(CaseError, match=r"1e\+11 voxels") as err:
            read_volume(path, case_id="bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.problem.check == "dimensions" and peak < 5_000_000


def test_mhd_header_bomb(tmp_path):
    (tmp_path / "b.raw").write_bytes(b"\0" * 64)
    (tmp_path / "b.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100\n"
                                    "ElementSpacing = 1 1 8\nElementType = MET_SHORT\n"
                                    "ElementDataFile = b.raw\n")
    with pytest.raises(CaseError, match="voxels") as err:
        read_volume(tmp_path / "b.mhd", case_id="b")
    assert err.value.problem.check == "dimensions"


def test_nonpositive_dim(tmp_path, write_nifti, tiny):
    path = write_nifti(tmp_path / "d.nii.gz", tiny.image())
    _raw_header(path, lambda h: h["dim"].__setitem__(2, 0))
    with pytest.raises(CaseError, match=r"every dimension must be >= 1"):
        read_volume(path, case_id="c")


@pytest.mark.parametrize("pixdim, match", [((-1.5, 1.5, 8.0), "axis 0: -1.5"),
                                           ((1.5, 0.0, 8.0), "axis 1: 0.0"),
                                           ((np.nan, 1.5, 8.0), "axis 0: nan"),
                                           ((12.0, 1.5, 8.0), "12 mm outside"),
                                           ((1.5, 0.05, 8.0), "0.05 mm outside"),
                                           ((1.5, 1.5, 40.0), "40 mm above 30")])
def test_spacing_checks(tmp_path, write_nifti, tiny, pixdim, match):
    path = write_nifti(tmp_path / "s.nii.gz", tiny.image())
    _raw_header(path, lambda h: h["pixdim"].__setitem__(slice(1, 4), pixdim))
    with pytest.raises(CaseError, match=match) as err:
        read_volume(path, case_id="c")
    assert err.value.problem.check == "spacing"


def test_unreadable_files(tmp_path, write_nifti, tiny):
    big = np.random.default_rng(0).normal(size=(40, 40, 8)).astype(np.float32)
    trunc = write_nifti(tmp_path / "t.nii.gz", big)
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    (tmp_path / "e.nii.gz").write_bytes(b"")
    (tmp_path / "w.nii.gz").write_text("not a nifti\n")
    (tmp_path / "w.mha").write_text("not an image\n")
    for name, match in [("t.nii.gz", "truncated or corrupt"), ("e.nii.gz", "empty"),
                        ("w.nii.gz", "cannot read the NIfTI header"), ("w.mha", "SimpleITK cannot"),
                        ("missing.nii", "does not exist")]:
        with pytest.raises(CaseError, match=match) as err:
            read_volume(tmp_path / name, case_id="case7")
        assert err.value.problem.check == "readable"
        assert err.value.problem.file.endswith(name) and "case7" in str(err.value)


@pytest.mark.parametrize("kind", ["nifti1_gz_scaled", "nifti2_gz_big_endian", "plain_nii",
                                  "cine_4d", "two_gzip_members"])
def test_one_shot_read_equals_nibabel_streaming(tmp_path, write_nifti, tiny, monkeypatch, kind):
    """The fast path (whole file, one ISA-L call) gives exactly nibabel's streaming result."""
    from pipelines.ingest import readers

    frame = None
    if kind == "nifti1_gz_scaled":
        path = write_nifti(tmp_path / "a.nii.gz", tiny.image(), slope=0.5, inter=3.0)
    elif kind == "nifti2_gz_big_endian":
        hdr = nib.Nifti2Header(endianness=">")
        path = tmp_path / "b.nii.gz"
        nib.save(nib.Nifti2Image(tiny.image(), tiny.affine, header=hdr), str(path))
        assert nib.load(path).header.endianness == ">"
    elif kind == "plain_nii":
        path = write_nifti(tmp_path / "c.nii", tiny.label())
    elif kind == "cine_4d":
        path = write_nifti(tmp_path / "d.nii.gz", np.stack([tiny.image(t) for t in range(3)], -1))
        frame = 1
    else:
        plain = write_nifti(tmp_path / "e.nii", tiny.image()).read_bytes()
        path = tmp_path / "e.nii.gz"
        path.write_bytes(gzip.compress(plain[:500]) + gzip.compress(plain[500:]))
    fast, fast_geom = read_volume(path, case_id="c", frame=frame)
    monkeypatch.setattr(readers, "ONE_SHOT_BYTES", 0)  # force nibabel's streaming reader
    slow, slow_geom = read_volume(path, case_id="c", frame=frame)
    assert fast.dtype == slow.dtype
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(fast_geom.matrix, slow_geom.matrix)
    if kind == "two_gzip_members":
        np.testing.assert_array_equal(fast, tiny.image())


def _gzip_bomb(path, image, affine, extra_bytes):
    """A valid NIfTI whose gzip stream goes on with ``extra_bytes`` zeros after the voxels."""
    raw = nib.Nifti1Image(image, affine).to_bytes()
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(raw)
        chunk = bytes(1 << 24)
        for _ in range(extra_bytes // len(chunk)):
            fh.write(chunk)
    return path


def test_gzip_bomb_refused_with_bounded_memory(tmp_path, tiny):
    """#14 item 2: 256 MiB of zeros behind a tiny valid volume -> refused, never inflated."""
    path = _gzip_bomb(tmp_path / "bomb.nii.gz", tiny.image(), tiny.affine, 256 << 20)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    with pytest.raises(CaseError, match=r"payload: decompresses to more than \d+ bytes.*declares shape"):
        read_volume(path, case_id="c")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB while refusing a gzip bomb"


def test_uncompressed_nifti_longer_than_declared_is_refused(tmp_path, tiny):
    path = tmp_path / "long.nii"
    path.write_bytes(nib.Nifti1Image(tiny.image(), tiny.affine).to_bytes() + bytes(1 << 20))
    with pytest.raises(CaseError, match=r"payload: file holds \d+ bytes, the header declares"):
        read_volume(path, case_id="c")
    path.write_bytes(nib.Nifti1Image(tiny.image(), tiny.affine).to_bytes() + bytes(100))
    np.testing.assert_array_equal(read_volume(path, case_id="c")[0], tiny.image())  # within slack


def test_multi_member_gzip_still_reads(tmp_path, tiny):
    raw = nib.Nifti1Image(tiny.image(), tiny.affine).to_bytes()
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(512))
    np.testing.assert_array_equal(read_volume(path, case_id="c")[0], tiny.image())


def test_singular_affine_refused(tmp_path, write_nifti, tiny):
    """#14 item 14: two parallel voxel axes -> 'affine' error at the header, no LinAlgError later."""
    aff = tiny.affine.copy()
    aff[:3, 1] = aff[:3, 0]
    path = write_nifti(tmp_path / "s.nii.gz", tiny.image(), aff)
    with pytest.raises(CaseError, match=r"affine: affine is singular"):
        read_header(path, case_id="c")


def test_scl_slope_overflow_names_the_scaling(tmp_path, write_nifti, tiny):
    """#14 item 14: scl_slope 1e38 on int16 data -> 'scaling' error naming slope and intercept."""
    path = write_nifti(tmp_path / "s.nii.gz", (tiny.image() * 100).astype(np.int16), slope=1e38, inter=0.0)
    with pytest.raises(CaseError, match=r"scaling: scaled intensities reach .* scl_slope=1e\+38, scl_inter=0"):
        read_volume(path, case_id="c")


@pytest.mark.parametrize("dtype, slope, inter", [(np.int16, 0.5, 3.0), (np.uint16, 0.0027, 0.055),
                                                 (np.int16, 1.0, 0.0), (np.uint8, 2.0, -7.0)])
def test_float32_read_matches_nibabel_within_rounding(tmp_path, write_nifti, tiny, dtype, slope, inter):
    """Scaled integer voxels read straight to float32 equal nibabel's float64 result to 1 ulp."""
    data = (np.abs(tiny.image()) * 40).astype(dtype)
    path = write_nifti(tmp_path / "f.nii.gz", data, slope=slope, inter=inter)
    image, _ = read_volume(path, case_id="c", dtype=np.float32)
    reference = nib.load(path).get_fdata()
    assert image.dtype == np.float32 and image.shape == reference.shape
    np.testing.assert_allclose(image, reference, rtol=2 ** -22, atol=abs(inter) * 2 ** -22)
    if (slope, inter) == (1.0, 0.0):  # without dtype, unscaled integers keep their type (labels)
        assert read_volume(path, case_id="c")[0].dtype == dtype


def test_scl_slope_overflow_is_refused_on_the_float32_path_too(tmp_path, write_nifti, tiny):
    path = write_nifti(tmp_path / "s.nii.gz", (tiny.image() * 100).astype(np.int16), slope=1e38, inter=0.0)
    with pytest.raises(CaseError, match=r"scaling: scaled intensities reach .* scl_slope=1e\+38"):
        read_volume(path, case_id="c", dtype=np.float32)
