"""The C boundary (csrc/sparse_runtime.h): the library reports each struct's size and field offsets,
and loading it refuses a library whose structs differ from the ctypes mirrors with ONE line naming
the fix (a stale build would otherwise make the decode step read garbage, silently)."""
import ctypes

import pytest

from sparse_runtime.errors import ConfigError
from sparse_runtime.kernels import decode, native

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason() or "no kernels")

ONE_LINE = "the compiled kernels do not match this Python package: rebuild with pip install -e ."


def test_mirrors_match_the_library():
    lb = native.lib()
    for name, cls in decode.STRUCTS.items():
        assert lb.sr_struct_size(name.encode()) == ctypes.sizeof(cls), name
        for field in (f[0] for f in cls._fields_):
            assert lb.sr_field_offset(name.encode(), field.encode()) == getattr(cls, field).offset, (name, field)
    assert lb.sr_struct_size(b"NoSuchStruct") == 0
    assert lb.sr_field_offset(b"SRModel", b"no_such_field") == -1


def _reload(monkeypatch):
    """Forget the loaded library (monkeypatch restores it after the test) and load it again."""
    monkeypatch.setattr(native, "_cdll", None)
    monkeypatch.setattr(native, "_reason", None)
    return native.available()


class _Grown(ctypes.Structure):  # CModel with one field too many: a different size
    _fields_ = [*decode.CModel._fields_, ("extra", ctypes.c_int64)]


class _Swapped(ctypes.Structure):  # CLinear with N and K swapped for pointers: same size, other offsets
    _fields_ = [("kind", ctypes.c_int32), ("isa", ctypes.c_int32), ("index", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("row_ptr", ctypes.c_void_p), ("bias", ctypes.c_void_p), *decode.CLinear._fields_[8:]]


_GROWN = f"SRModel is {ctypes.sizeof(decode.CModel)} bytes in the library, {ctypes.sizeof(_Grown)} in Python"
_SWAPPED = (f"SRLinear.index is at byte {_Swapped.index.offset} in Python; the library puts it at byte "
            f"{decode.CLinear.index.offset}")


@pytest.mark.parametrize("name, mirror, detail", [("SRModel", _Grown, _GROWN), ("SRLinear", _Swapped, _SWAPPED)])
def test_a_mismatched_mirror_is_refused_in_one_line(monkeypatch, name, mirror, detail):
    monkeypatch.setitem(decode.STRUCTS, name, mirror)
    assert not _reload(monkeypatch)
    reason = native.unavailable_reason()
    assert reason.startswith(ONE_LINE) and detail in reason and "\n" not in reason
    with pytest.raises(ConfigError) as e:  # every user of the kernels gives the same line
        native.lib()
    assert str(e.value) == reason
    with pytest.raises(ConfigError, match="rebuild with pip install -e"):
        native.select_isa()
    from sparse_runtime.runtime.base import EngineUnavailableError
    from sparse_runtime.runtime.lean_cpu import SparseCPUEngine

    with pytest.raises(EngineUnavailableError, match="rebuild with pip install -e"):
        SparseCPUEngine.check_available()


def test_a_library_without_the_check_is_refused(monkeypatch):
    class Old:  # a build from before sr_struct_size
        pass

    with pytest.raises(native.AbiMismatch, match="predates the struct check"):
        native.check_structs(Old(), decode.STRUCTS)


def test_the_library_loads_again_once_the_mirrors_match(monkeypatch):
    assert _reload(monkeypatch) and native.unavailable_reason() is None
