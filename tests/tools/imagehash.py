#!/usr/bin/python3
"""imagehash.py CONF POOL IMAGE[@SNAP]: prints the content digest of a whole
RBD image (holes read as zeros), the same on every site for equal content."""
import sys

import cairn_testlib as lib

if len(sys.argv) != 4:
    sys.exit("usage: imagehash.py CONF POOL IMAGE[@SNAP]")
conf, pool, spec = sys.argv[1:]
image, _, snap = spec.partition("@")
site = lib.Site(conf, pool)
try:
    print(site.digest(image, snap or None))
finally:
    site.close()
