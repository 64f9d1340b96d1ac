"""Cairn's Cinder volume driver (cairn_cinder), for Debian's python3.

    cd cinder_driver_shim && python3 setup.py build && python3 setup.py install

build_py generates cairn_cinder/cairn_pb2.py from ../proto/cairn.proto
(protoc, Debian package protobuf-compiler) into the build tree, so an
installed package always carries the control messages of the proto it was
built from. CAIRN_PROTO_DIR overrides where cairn.proto is looked for.
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.environ.get("CAIRN_PROTO_DIR", os.path.join(HERE, "..", "proto"))


class BuildWithProto(build_py):
    """build_py, then protoc -I<proto dir> --python_out=<built package dir>."""

    def run(self):
        super().run()
        proto = os.path.join(PROTO_DIR, "cairn.proto")
        out = os.path.join(self.build_lib, "cairn_cinder")
        if not os.path.isfile(proto):
            if os.path.isfile(os.path.join(out, "cairn_pb2.py")):
                print(f"cairn_cinder: {proto} not found; using the cairn_pb2.py already in "
                      "the package")
                return
            raise SystemExit(f"cairn_cinder: {proto} not found and no cairn_pb2.py in the "
                             "package; build from a Cairn source tree or set CAIRN_PROTO_DIR")
        protoc = shutil.which("protoc")
        if protoc is None:
            raise SystemExit("cairn_cinder: protoc not found; install it "
                             "(apt-get install protobuf-compiler)")
        os.makedirs(out, exist_ok=True)
        cmd = [protoc, f"-I{PROTO_DIR}", f"--python_out={out}", proto]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


setup(
    name="cairn_cinder",
    version="0.1.0",
    description="Cinder volume driver: Ceph RBD replicated across sites by Cairn's cairnd",
    packages=["cairn_cinder"],
    python_requires=">=3.9",
    # Debian packages: python3-cinder, python3-protobuf, python3-xxhash.
    install_requires=[],
    cmdclass={"build_py": BuildWithProto},
)
