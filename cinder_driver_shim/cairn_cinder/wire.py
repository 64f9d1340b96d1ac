"""Cairn frames (docs/FORMAT.md) and a client of cairnd's control socket.

A frame is a 32-byte header ("CARN", version 1, type, body and payload
lengths, XXH3-64 of the body, XXH3-64 of the header's first 24 bytes), a
protobuf body and a raw payload. The control API is one ControlRequest
frame answered by one ControlReply frame, over cairnd's Unix socket.
"""
import socket
import struct
import time

import xxhash

from cairn_cinder import cairn_pb2 as pb

MAGIC = b"CARN"
VERSION = 1
HEADER = struct.Struct("<4sHHIIQQ")
MAX_BODY = 1 << 20
MAX_PAYLOAD = 8 << 20

HELLO, HELLO_REPLY, EPOCH_ACK, LINK_ERROR = 10, 11, 12, 13
CONTROL_REQUEST, CONTROL_REPLY = 20, 21

# cairn::Code (engine/base/status.h)
CODES = {0: "OK", 1: "Cancelled", 2: "Unknown", 3: "InvalidArgument", 4: "DeadlineExceeded",
         5: "NotFound", 6: "AlreadyExists", 7: "PermissionDenied", 8: "ResourceExhausted",
         9: "FailedPrecondition", 10: "Aborted", 11: "OutOfRange", 12: "Unimplemented",
         13: "Internal", 14: "Unavailable", 15: "DataLoss"}


def retention_of_specs(specs):
    """A volume type's extra specs (or a group type's group specs)
    'cairn:keep_points' and 'cairn:retention' ("1h*24 1d*30") as the
    (keep_points, tiers) of register(); None if neither is set. keep_points
    defaults to 24. ValueError, saying which spec, if keep_points is not a
    count (cairnd checks the tiers)."""
    specs = specs or {}
    keep, tiers = specs.get('cairn:keep_points'), specs.get('cairn:retention')
    if keep is None and tiers is None:
        return None
    try:
        count = 24 if keep is None else int(keep)
        if count < 0:
            raise ValueError(keep)
    except ValueError:
        raise ValueError("spec cairn:keep_points=%r is not a count of restore points" % keep)
    return count, tiers or ""


def snapshot_retention_of_specs(specs):
    """Spec 'cairn:snapshot_retention' ("1d*7"): tiers of the volume's
    snapshots kept at the source, as register()'s snapshot_retention."""
    return (specs or {}).get('cairn:snapshot_retention', "")


class WireError(Exception):
    """A frame that is not what it claims (DataLoss in cairnd's terms)."""


def encode(ftype, body=b"", payload=b"", version=VERSION):
    head = struct.pack("<4sHHIIQ", MAGIC, version, ftype, len(body), len(payload),
                       xxhash.xxh3_64_intdigest(body))
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + body + payload


def _read_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            if not out:
                return None
            raise WireError(f"truncated frame: {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def read_frame(sock):
    """(type, body, payload), or None at a clean end of stream."""
    head = _read_exact(sock, HEADER.size)
    if head is None:
        return None
    magic, version, ftype, body_len, payload_len, body_xxh, head_xxh = HEADER.unpack(head)
    if magic != MAGIC:
        raise WireError(f"bad frame magic 0x{magic.hex()}")
    if xxhash.xxh3_64_intdigest(head[:24]) != head_xxh:
        raise WireError("frame header checksum mismatch")
    if version != VERSION:
        raise WireError(f"unsupported frame version {version} (this client speaks {VERSION})")
    if body_len > MAX_BODY or payload_len > MAX_PAYLOAD:
        raise WireError("frame too large")
    body = _read_exact(sock, body_len) if body_len else b""
    payload = _read_exact(sock, payload_len) if payload_len else b""
    if body is None or payload is None:
        raise WireError("truncated frame")
    if xxhash.xxh3_64_intdigest(body) != body_xxh:
        raise WireError("frame body checksum mismatch")
    return ftype, body, payload


class CairnError(Exception):
    """cairnd answered with an error: .code is cairn's code name."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CairndUnavailable(CairnError):
    def __init__(self, message):
        super().__init__("Unavailable", message)


class ControlClient:
    """One request per connection to cairnd's control socket."""

    def __init__(self, socket_path, timeout=30.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, request):
        """Sends a cairn_pb2.ControlRequest; returns the ControlReply or
        raises CairnError (cairnd said no) / CairndUnavailable (no cairnd)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.socket_path)
                s.sendall(encode(CONTROL_REQUEST, request.SerializeToString()))
                frame = read_frame(s)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise CairndUnavailable(f"cairnd is not running (no control socket at "
                                    f"{self.socket_path}: {e.strerror})") from None
        except (socket.timeout, TimeoutError):
            raise CairndUnavailable(f"cairnd at {self.socket_path} did not answer within "
                                    f"{self.timeout:.0f} s") from None
        except OSError as e:
            raise CairndUnavailable(f"cairnd at {self.socket_path}: {e}") from None
        if frame is None:
            raise CairndUnavailable(f"cairnd at {self.socket_path} closed without an answer")
        ftype, body, _ = frame
        if ftype != CONTROL_REPLY:
            raise WireError(f"cairnd answered with frame type {ftype}, not a ControlReply")
        reply = pb.ControlReply()
        reply.ParseFromString(body)
        if reply.code != 0:
            raise CairnError(CODES.get(reply.code, f"code {reply.code}"), reply.message)
        return reply

    def status(self, volume=""):
        req = pb.ControlRequest()
        req.status.volume = volume
        return list(self.call(req).status.volumes)

    def points(self, volume):
        req = pb.ControlRequest()
        req.points.volume = volume
        return list(self.call(req).points.points)

    def replicate(self, volume):
        """Starts an epoch of a source volume now; the ReplicateReply says
        the seq of the restore point it will make (wait for it with status()
        at the source or points() at the standby)."""
        req = pb.ControlRequest()
        req.replicate.volume = volume
        return self.call(req).replicate

    def register(self, volume, pool, image, target_pool="", target_image="", group="",
                 retention=None, snapshot_retention=""):
        """Source side: replicate pool/image as `volume` from now on (it
        persists across cairnd restarts). Empty targets take cairnd's
        defaults (pool; image + ".standby"). group: a member of that
        consistency group (the RBD group of that name in pool, which must
        hold the image); a registered volume registered again with another
        group (or none) moves. retention: (keep_points, tiers) kept at the
        standby for this volume (retention_of_specs); None: cairnd's
        [source] rules, else the sink's. snapshot_retention: tiers of its
        snapshots kept at the source ("": [source]'s). Returns the
        RegisterReply."""
        req = pb.ControlRequest()
        r = req.register_volume
        r.volume, r.pool, r.image = volume, pool, image
        r.target_pool, r.target_image = target_pool, target_image
        r.group = group
        if retention is not None:
            r.retention.keep_points, r.retention.tiers = retention
        r.snapshot_retention = snapshot_retention
        return self.call(req).register_volume

    def register_many(self, volumes, group, retention=None, snapshot_retention=""):
        """Source side: the members of consistency group `group` registered
        at once, all or none, in one pool: volumes are (volume, pool, image,
        target_image) tuples; retention and snapshot_retention as
        register()'s, for every member.
        The group's schedule starts once with all of them (register() one
        by one restarts it each time). Returns the members' VolumeStatus."""
        req = pb.ControlRequest()
        for volume, pool, image, target_image in volumes:
            r = req.register_volumes.volumes.add()
            r.volume, r.pool, r.image, r.target_image = volume, pool, image, target_image
            r.group = group
            if retention is not None:
                r.retention.keep_points, r.retention.tiers = retention
            r.snapshot_retention = snapshot_retention
        return list(self.call(req).register_volumes.status)

    def unregister(self, volume, remove_snapshots=True):
        """Source side: stop replicating `volume` and forget it; with
        remove_snapshots its cairn.<N> snapshots go too. Restore points at
        the standby stay. Returns the UnregisterReply."""
        req = pb.ControlRequest()
        req.unregister_volume.volume = volume
        req.unregister_volume.remove_snapshots = remove_snapshots
        return self.call(req).unregister_volume

    def promote(self, volume, to_image, seq=0, pool=""):
        """Standby side (failover): fence `volume` and clone restore point
        `seq` (0: the newest) into pool/to_image. Returns the PromoteReply
        (the point, where it went, and whether it was promoted so before)."""
        req = pb.ControlRequest()
        p = req.promote
        p.volume, p.seq, p.pool, p.to_image = volume, seq, pool, to_image
        return self.call(req).promote

    def failback(self, volume, seq=0):
        """Standby side (planned failback): restore point `seq` (0: the
        newest) of the volume's source here reached the primary site; that
        site's image becomes the primary again, this site's standby image
        takes the point, the volume is released. Returns the FailbackReply
        (seq, primary_site, kept_as, copied_bytes)."""
        req = pb.ControlRequest()
        req.failback.volume, req.failback.seq = volume, seq
        return self.call(req).failback

    def wait_for_point(self, volume, seq, timeout):
        """Source side: waits until `volume`'s newest restore point is `seq`
        or later (polling status, a local in-memory read) and returns it;
        raises CairndUnavailable after `timeout` seconds, with the source's
        last error."""
        deadline = time.monotonic() + timeout
        while True:
            mine = [v for v in self.status(volume) if v.role == "source"]
            have = mine[0].last_seq if mine else 0
            if have >= seq:
                return have
            if time.monotonic() > deadline:
                raise CairndUnavailable(
                    f"restore point {seq} of {volume} was not made within {timeout:.0f} s "
                    f"(newest: {have}; last error: {(mine[0].error if mine else '') or 'none'})")
            time.sleep(0.05)

    def release(self, volume):
        """Standby side (failback): lift the fence of `volume`; the promoted
        image is kept under ReleaseReply.kept_as."""
        req = pb.ControlRequest()
        req.release.volume = volume
        return self.call(req).release

    def group_points(self, group):
        """Standby side: the group points of consistency group `group`,
        oldest first (each: seq, source_time_ns, volumes)."""
        return list(self._group(group, pb.GroupRequest.POINTS).points)

    def _group(self, group, action, **fields):
        req = pb.ControlRequest()
        req.group.group, req.group.action = group, action
        for key, value in fields.items():
            setattr(req.group, key, value)
        return self.call(req).group

    def group_status(self, group):
        """Source side: the status of the consistency group `group` this
        cairnd replicates (raises NotFound if none)."""
        return list(self._group(group, pb.GroupRequest.STATUS).status)

    def group_replicate_back(self, group, volumes, retention=None, snapshot_retention=""):
        """Standby side, after each volume of `group` was promoted here:
        the promoted images replicate back as one group (an RBD group of
        them at this site), so the primary site gets group points and
        group_failback brings all home at one. volumes: (volume,
        home pool, home image) tuples; retention as register()'s. Returns
        the members' VolumeStatus."""
        req = pb.ControlRequest()
        req.group.group, req.group.action = group, pb.GroupRequest.REPLICATE_BACK
        for volume, pool, image in volumes:
            r = req.group.back.volumes.add()
            r.volume, r.target_pool, r.target_image = volume, pool, image
            if retention is not None:
                r.retention.keep_points, r.retention.tiers = retention
            r.snapshot_retention = snapshot_retention
        return list(self.call(req).group.back)

    def group_failback(self, group, timeout):
        """Standby side (planned failback of a group replicating back): an
        instant of every member now, waited for until it is a group point
        at the primary site (at most `timeout` s), then every member handed
        back at it. Returns the GroupReply (seq, primary_site, images: the
        promoted images as kept)."""
        want = self._group(group, pb.GroupRequest.REPLICATE).seq
        deadline = time.monotonic() + timeout
        while True:
            status = self.group_status(group)
            have = status[0].last_seq if status else 0
            if have >= want:
                break
            if time.monotonic() > deadline:
                raise CairndUnavailable(
                    f"group point {want} of {group} was not made within {timeout:.0f} s "
                    f"(newest: {have}; last error: "
                    f"{(status[0].error if status else '') or 'none'})")
            time.sleep(0.05)
        return self._group(group, pb.GroupRequest.FAILBACK, seq=want)
