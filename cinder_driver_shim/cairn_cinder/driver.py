"""Cinder volume driver: Ceph RBD volumes replicated to a standby site by
Cairn (cairnd), failed over from Cairn's verified restore points.

CairnRBDDriver is Cinder's RBD driver for everything a volume does at the
active site; only replication differs. Instead of rbd-mirror (journaling,
mirror promote/demote) it asks cairnd over its control socket:

- a volume of a type with replication_enabled='<is> True' is registered
  with the site A cairnd (source) when it is created or retyped, and
  unregistered when it is deleted or retyped away;
- failover promotes, at the site B cairnd (sink), the newest restore point
  of each such volume (or the one named by its `cairn_failover_point`
  metadata) into the image name Cinder uses, in the same pool of cluster B;
  and has site B's cairnd replicate each promoted image back into its image
  at site A as soon as site A's cairnd answers;
- failback ('default') brings each volume home with nothing lost: a final
  delta from site B, site A's image the primary again, site B's standby
  image at that same point, replication from site A resumed as a delta
  (cairn failback). A volume that was not replicated back is released
  instead: its image at site B is kept under a new name;
- generic volume groups of a type with consistent_group_replication_enabled
  replicate at one instant, and fail over and back whole (groups.py).

All replication logic lives in cairnd; this module only maps Cinder's calls
to control requests and cairnd's answers to Cinder's volume states.
See docs/CINDER.md.

Thread-safety: as Cinder's RBD driver (one driver object per backend; each
control request is one short-lived Unix-socket connection).
"""
import datetime
import json
import math

from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import excutils
from oslo_utils import units

from cinder import exception
from cinder import interface
from cinder.objects import fields
from cinder.volume import configuration
from cinder.volume.drivers import rbd

from cairn_cinder import groups as cairn_groups
from cairn_cinder import wire

LOG = logging.getLogger(__name__)

CAIRN_OPTS = [
    cfg.StrOpt('cairn_control_socket',
               default='/run/cairn/cairnd.sock',
               help='Control socket of the cairnd that replicates this '
                    'backend\'s pool at the primary site (site A): volumes '
                    'of replicated types are registered there. Its config '
                    'needs a [source] section whose pools include rbd_pool.'),
    cfg.StrOpt('cairn_standby_control_socket',
               default='',
               help='Control socket of the cairnd at the standby site (site '
                    'B, the sink named by replication_device), used at '
                    'failover (promote) and failback (release). It is a '
                    'Unix socket: on a site A host, forward it (for example '
                    'with ssh -L or socat) or run the failover from a host '
                    'at site B.'),
    cfg.StrOpt('cairn_target_suffix',
               default='.standby',
               help='The standby image of a volume at site B is named '
                    '<volume name><suffix> (in the same pool). The image '
                    'Cinder uses after a failover is <volume name> itself: '
                    'a clone of a restore point of the standby image.'),
    cfg.FloatOpt('cairn_timeout',
                 default=30.0,
                 min=1.0,
                 help='Seconds to wait for cairnd to answer one control '
                      'request.'),
    cfg.FloatOpt('cairn_failback_timeout',
                 default=600.0,
                 min=1.0,
                 help='Seconds a failback waits for the final delta of one '
                      'volume to reach site A (and for site B to take it '
                      'into its standby image) before it gives up on that '
                      'volume.'),
]

CONF = cfg.CONF
CONF.register_opts(CAIRN_OPTS, group=configuration.SHARED_CONF_GROUP)

# Volume metadata key: the restore point a failover brings the volume back
# at: a restore point number (`cairn points VOLUME_ID` at site B), "latest"
# (the default), or an ISO 8601 time (the newest point taken at the source
# at or before it, e.g. 2026-11-25T05:59:00Z).
FAILOVER_POINT_KEY = 'cairn_failover_point'

# Cinder keeps replication_driver_data in a String(255) column.
_DRIVER_DATA_MAX = 255

ENABLED = fields.ReplicationStatus.ENABLED
ERROR = fields.ReplicationStatus.ERROR
DISABLED = fields.ReplicationStatus.DISABLED
FAILED_OVER = fields.ReplicationStatus.FAILED_OVER
FAILOVER_ERROR = fields.ReplicationStatus.FAILOVER_ERROR
NOT_CAPABLE = fields.ReplicationStatus.NOT_CAPABLE


class _PointChoiceError(Exception):
    """The cairn_failover_point metadata names no usable restore point."""


def _iso(ns):
    if not ns:
        return None
    t = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return t.isoformat(timespec='milliseconds').replace('+00:00', 'Z')


def _parse_time(text):
    t = datetime.datetime.fromisoformat(text.strip().replace('Z', '+00:00'))
    if t.tzinfo is None:
        raise ValueError('a time needs its zone (Z or +HH:MM)')
    d = t - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (d.days * 86400 + d.seconds) * 10**9 + d.microseconds * 1000


def _driver_data(**values):
    """replication_driver_data as compact JSON, within Cinder's 255 chars:
    optional keys are dropped (target first: it is derivable) if need be."""
    data = {k: v for k, v in values.items() if v is not None}
    for drop in (None, 'target', 'point_time', 'kept_as'):
        if drop:
            data.pop(drop, None)
        text = json.dumps(data, separators=(',', ':'), sort_keys=True)
        if len(text) <= _DRIVER_DATA_MAX:
            return text
    return json.dumps({'cairn': 1})


def _broken(status):
    """A source volume whose replication does not work: its last attempt
    failed on site A's side, or it fails and never made a restore point."""
    return status.state == 'error' or (status.last_seq == 0 and status.errors_total > 0)


def _load_driver_data(volume):
    try:
        data = json.loads(volume.replication_driver_data or '{}')
        return data if isinstance(data, dict) else {}
    except (ValueError, TypeError):
        return {}


@interface.volumedriver
class CairnRBDDriver(cairn_groups.GroupReplicationMixin, rbd.RBDDriver):
    """RBD driver whose replication is Cairn's (see the module docstring);
    group replication in groups.py."""

    VERSION = '0.1.0'

    # For groups.py.
    _group_data = staticmethod(_driver_data)
    _load_data = staticmethod(_load_driver_data)
    _iso = staticmethod(_iso)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(CAIRN_OPTS)
        self._retype_to = {}  # volume id -> the type a retype sets up

    @classmethod
    def get_driver_options(cls):
        return super().get_driver_options() + CAIRN_OPTS

    # -- cairnd clients ------------------------------------------------------

    def _source(self):
        return wire.ControlClient(self.configuration.cairn_control_socket,
                                  self.configuration.cairn_timeout)

    def _standby(self):
        path = self.configuration.cairn_standby_control_socket
        if not path:
            raise exception.InvalidReplicationTarget(reason=(
                'Cairn: cairn_standby_control_socket is not set in backend %s: '
                'failover and failback need the control socket of the site B '
                'cairnd; set it and restart cinder-volume' % self._backend_name))
        return wire.ControlClient(path, self.configuration.cairn_timeout)

    def _target_image(self, volume):
        return volume.name + self.configuration.cairn_target_suffix

    def _standby_name(self):
        return (self._replication_targets[0]['name']
                if self._replication_targets else 'the standby site')

    def _failed_over(self):
        return self._active_backend_id not in (None, '', 'default')

    def _is_cairn_volume(self, volume):
        """Replicated by Cairn: a replicated type, or registered before
        (its driver data is Cairn's)."""
        return (self._is_replicated_type(volume.volume_type)
                or 'target' in _load_driver_data(volume))

    # -- setup ---------------------------------------------------------------

    def do_setup(self, context):
        super().do_setup(context)
        if len(self._replication_targets) > 1:
            raise exception.InvalidConfigurationValue(
                option='replication_device',
                value=', '.join(t['name'] for t in self._replication_targets))
        if not self._replication_targets:
            LOG.warning('Cairn: backend %s has no replication_device: it '
                        'reports replication_enabled False and cannot fail '
                        'over; add replication_device = backend_id:site-b,'
                        'conf:<site B ceph.conf>,user:<cephx user>',
                        self._backend_name)
        elif not self.configuration.cairn_standby_control_socket:
            LOG.warning('Cairn: backend %s has no cairn_standby_control_socket:'
                        ' failover to %s will be refused until it is set',
                        self._backend_name, self._standby_name())

    def check_for_setup_error(self):
        super().check_for_setup_error()
        if self._failed_over():
            return
        try:
            self._source().status()
        except wire.CairnError as e:
            # Non-replicated volumes still work: warn, do not refuse to start.
            LOG.warning('Cairn: the site A cairnd does not answer (%s): '
                        'volumes of replicated types cannot be created or '
                        'deleted until it runs', e)

    # -- replication of one volume -----------------------------------------

    def _setup_volume(self, volume, volume_type=None):
        # The parent wraps any failure of _enable/_disable_replication in a
        # ReplicationError of its own ("Failed to enable image replication");
        # surface ours, which says what went wrong and what to do. A retype
        # (volume_type: the new one; volume.volume_type is still the old
        # one until it returns) registers with the new type's specs.
        if volume_type is not None:
            self._retype_to[volume.id] = volume_type
        try:
            return super()._setup_volume(volume, volume_type)
        except exception.ReplicationError as e:
            cause = e.__context__
            if isinstance(cause, exception.ReplicationError) and cause is not e:
                raise cause from None
            raise
        finally:
            self._retype_to.pop(volume.id, None)

    # Cinder 21's RBDDriver.create_volume and _clone remove the new image
    # when _setup_volume fails, but through an ioctx whose RADOS client
    # they already shut down: librbd then crashes the process (SIGSEGV).
    # Replication setup fails whenever cairnd is down, so both are redone
    # here with the cleanup inside the connection.

    def create_volume(self, volume):
        """Creates the image, then registers it (replicated types); an image
        that cannot be registered is removed again."""
        if volume.encryption_key_id:
            self._create_encrypted_volume(volume, volume.obj_context)
            return self._setup_or_remove(volume, None)
        size = int(volume.size) * units.Gi
        order = int(math.log(self.configuration.rbd_store_chunk_size * units.Mi, 2))
        LOG.debug("creating volume '%s'", volume.name)
        with rbd.RADOSClient(self) as client:
            self.RBDProxy().create(client.ioctx, volume.name, size, order,
                                   old_format=False, features=client.features)
            return self._setup_or_remove(volume, client)

    def _clone(self, volume, src_pool, src_image, src_snap):
        LOG.debug('cloning %(pool)s/%(img)s@%(snap)s to %(dst)s',
                  dict(pool=src_pool, img=src_image, snap=src_snap,
                       dst=volume.name))
        with rbd.RADOSClient(self, src_pool) as src_client:
            stripe_unit = self._get_stripe_unit(src_client.ioctx, src_image)
            order = int(math.log(stripe_unit, 2))
            with rbd.RADOSClient(self) as dest_client:
                self.RBDProxy().clone(src_client.ioctx, src_image, src_snap,
                                      dest_client.ioctx, volume.name,
                                      features=src_client.features,
                                      order=order)
                return self._setup_or_remove(volume, dest_client) or {}

    def _setup_or_remove(self, volume, client):
        try:
            return self._setup_volume(volume)
        except Exception:
            with excutils.save_and_reraise_exception():
                LOG.error('Error creating rbd image %s: removing it', volume.name)
                if client is None:
                    with rbd.RADOSClient(self) as c:
                        self.RBDProxy().remove(c.ioctx, volume.name)
                else:
                    self.RBDProxy().remove(client.ioctx, volume.name)

    def _enable_replication(self, volume):
        """Registers the volume with the site A cairnd (replaces rbd-mirror's
        journaling + mirror_image_enable)."""
        if self._failed_over():
            raise exception.ReplicationError(volume_id=volume.id, reason=(
                'Cairn: backend %s is failed over to %s; volumes of replicated '
                'types can be created (or retyped to one) only after failback'
                % (self._backend_name, self._active_backend_id)))
        pool = self.configuration.rbd_pool
        target = self._target_image(volume)
        retention = self._retention_args(volume)
        src = self._source()
        try:
            src.register(volume.id, pool, volume.name, target_image=target,
                         **retention)
        except wire.CairndUnavailable as e:
            raise exception.ReplicationError(volume_id=volume.id, reason=(
                'Cairn: cannot register %s/%s for replication: %s; start '
                'cairnd at site A (cairnd -c /etc/cairn/cairnd.conf) or fix '
                'cairn_control_socket, then create the volume again'
                % (pool, volume.name, e.message)))
        except wire.CairnError as e:
            raise exception.ReplicationError(volume_id=volume.id, reason=(
                'Cairn: cairnd at %s refused to register %s/%s (standby image '
                '%s): %s' % (src.socket_path, pool, volume.name, target, e)))
        LOG.info('Cairn: volume %s (%s/%s) registered for replication to %s '
                 '(standby image %s)', volume.id, pool, volume.name,
                 self._standby_name(), target)
        return {'replication_status': ENABLED,
                'replication_driver_data': _driver_data(target=target)}

    def _retention_args(self, volume):
        """register()'s retention and snapshot_retention from its type's
        extra specs cairn:keep_points, cairn:retention (how many restore
        points site B keeps) and cairn:snapshot_retention (its snapshots
        kept at site A)."""
        vtype = self._retype_to.get(volume.id, volume.volume_type)
        specs = vtype.extra_specs if vtype else {}
        try:
            return {'retention': wire.retention_of_specs(specs),
                    'snapshot_retention': wire.snapshot_retention_of_specs(specs)}
        except ValueError as e:
            raise exception.ReplicationError(volume_id=volume.id, reason=(
                'Cairn: volume type %s: %s' % (vtype.name if vtype else None, e)))

    def _disable_replication(self, volume):
        """Unregisters the volume (its cairn.<N> snapshots go; the restore
        points at site B stay)."""
        if self._failed_over():
            raise exception.ReplicationError(volume_id=volume.id, reason=(
                'Cairn: backend %s is failed over to %s; replication of a '
                'volume can be disabled only after failback'
                % (self._backend_name, self._active_backend_id)))
        self._unregister(volume, exception.ReplicationError)
        return {'replication_status': DISABLED,
                'replication_driver_data': None}

    def _unregister(self, volume, error):
        src = self._source()
        try:
            src.unregister(volume.id, remove_snapshots=True)
            LOG.info('Cairn: volume %s unregistered (no longer replicated; '
                     'its restore points at %s stay)', volume.id,
                     self._standby_name())
        except wire.CairnError as e:
            if e.code == 'NotFound':
                LOG.debug('Cairn: volume %s was not registered', volume.id)
                return
            what = ('%s; start cairnd at site A (or fix cairn_control_socket)'
                    ' and try again' % e.message
                    if isinstance(e, wire.CairndUnavailable)
                    else 'cairnd at %s: %s' % (src.socket_path, e))
            reason = ('Cairn: cannot unregister volume %s (%s): %s'
                      % (volume.id, volume.name, what))
            if error is exception.ReplicationError:
                raise error(volume_id=volume.id, reason=reason)
            raise error(data=reason)

    def delete_volume(self, volume):
        """Unregisters a replicated volume first (so its cairn.<N>
        snapshots go and cairnd stops reading it), then deletes it."""
        if self._is_cairn_volume(volume):
            try:
                self._unregister(volume, exception.VolumeBackendAPIException)
            except exception.VolumeBackendAPIException as e:
                if not self._failed_over():
                    raise
                # Site A may be gone for good: the image to delete is the
                # promoted one at site B.
                LOG.warning('Cairn: %s; deleting the failed-over volume at %s '
                            'anyway: unregister it at site A once it is back',
                            e.msg, self._active_backend_id)
            if self._failed_over():
                self._remove_cairn_snapshots(volume)
        super().delete_volume(volume)

    def _remove_cairn_snapshots(self, volume):
        """A failed-over volume is the promoted image at site B, with the
        snapshot cairn.<N> of the point it came from (for failback): it
        goes with the volume, which RBD removes only without snapshots."""
        try:
            with rbd.RBDVolumeProxy(self, volume.name) as image:
                for snap in image.list_snaps():
                    if snap['name'].startswith('cairn.'):
                        image.remove_snap(snap['name'])
        except self.rbd.ImageNotFound:
            pass  # nothing to delete: the parent says so

    # -- failover and failback ------------------------------------------------

    def failover(self, context, volumes, secondary_id=None, groups=None):
        """Failover (secondary_id None or the replication_device backend_id)
        promotes each replicated volume's restore point at site B; failback
        ('default') releases them. Returns (backend_id, updates, [])."""
        if not self._is_replication_enabled:
            raise exception.UnableToFailOver(reason=(
                'Cairn: backend %s has no replication_device, so no standby '
                'site to fail over to' % self._backend_name))
        failback = secondary_id == 'default'
        secondary_id, _remote = self._get_failover_target_config(secondary_id)
        standby = self._standby()
        try:
            standby.status()
        except wire.CairnError as e:
            # InvalidReplicationTarget: Cinder then keeps the service's
            # replication state as it was, so the same command can be run
            # again once site B's cairnd answers. Nothing was changed.
            raise exception.InvalidReplicationTarget(reason=(
                'Cairn: cannot reach the cairnd of %s: %s; nothing was %s: '
                'start cairnd at site B (or fix cairn_standby_control_socket)'
                ' and run it again' % (self._standby_name(), e.message,
                                       'failed back' if failback
                                       else 'failed over')))
        if failback:
            updates = [self._failback_volume(standby, v) for v in volumes]
            self._warn_if_source_down()
        else:
            updates = [self._failover_volume_cairn(standby, v) for v in volumes]
        bad = [u['volume_id'] for u in updates
               if u['updates'].get('status') == 'error']
        LOG.warning('Cairn: %s to %s done: %d volume(s), %d in error%s',
                    'failback' if failback else 'failover', secondary_id,
                    len(updates), len(bad), (': %s' % ', '.join(bad)) if bad else '')
        return secondary_id, updates, []

    def _error_update(self, volume, replication_status):
        return {'volume_id': volume.id,
                'updates': {'status': 'error',
                            'previous_status': volume.status,
                            'replication_status': replication_status}}

    def _failover_volume_cairn(self, standby, volume):
        pool = self.configuration.rbd_pool
        seq = 0
        if not self._is_cairn_volume(volume):
            # Its data is only at site A. Cinder's manager records any
            # volume in status error as failover-error (it does the same with
            # the volumes it knows are not replicated, as not-capable).
            LOG.error('Cairn: volume %s is not of a replicated type: it was '
                      'never replicated to %s and is NOT failed over; its data '
                      'stays at site A (failback brings it back)',
                      volume.id, self._standby_name())
            return self._error_update(volume, NOT_CAPABLE)
        try:
            seq = self._failover_seq(standby, volume)
            reply = standby.promote(volume.id, volume.name, seq=seq, pool=pool)
        except _PointChoiceError as e:
            LOG.error('Cairn: volume %s is NOT failed over: %s', volume.id, e)
            return self._error_update(volume, FAILOVER_ERROR)
        except wire.CairnError as e:
            if e.code == 'NotFound' and not seq:
                LOG.error('Cairn: volume %s is NOT failed over: it has no restore '
                          'point at %s yet (its first epoch never completed); '
                          'no image was created there, its data is only at site '
                          'A (%s)', volume.id, self._standby_name(), e.message)
            else:
                LOG.error('Cairn: volume %s is NOT failed over: promoting %s at '
                          '%s failed: %s', volume.id,
                          ('restore point %d' % seq) if seq else 'its newest point',
                          self._standby_name(), e)
            return self._error_update(volume, FAILOVER_ERROR)
        point = reply.point
        when = _iso(point.source_time_ns)
        LOG.warning('Cairn: volume %s FAILED OVER to %s at restore point %d, '
                    'taken at site A at %s%s: now %s/%s there%s', volume.id,
                    self._standby_name(), point.seq, when,
                    ' (chosen by its %s metadata)' % FAILOVER_POINT_KEY if seq else '',
                    reply.pool, reply.image, ' (promoted before)' if reply.again else '')
        self._replicate_back(standby, volume, reply)
        return {'volume_id': volume.id,
                'updates': {'replication_status': FAILED_OVER,
                            'replication_driver_data': _driver_data(
                                target=self._target_image(volume),
                                seq=point.seq, point_time=when)}}

    def _replicate_back(self, standby, volume, promoted):
        """Has site B's cairnd replicate the promoted image back into the
        volume's image at site A, from the point both hold, as soon as site
        A's cairnd answers: failback then loses nothing. Without it (no
        [source] section at site B) failback keeps B's writes aside."""
        try:
            retention = self._retention_args(volume)
        except exception.ReplicationError as e:
            # The volume is promoted already: it replicates back by
            # cairnd's rules rather than not at all.
            LOG.warning('Cairn: volume %s replicates back by cairnd\'s '
                        'retention rules: %s', volume.id, e)
            retention = {}
        try:
            standby.register(volume.id, promoted.pool, promoted.image,
                             target_pool=self.configuration.rbd_pool,
                             target_image=volume.name, **retention)
        except wire.CairnError as e:
            LOG.warning('Cairn: volume %s is not replicated back to site A '
                        '(%s): a failback keeps what is written at %s aside '
                        'there, not in the volume; give the site B cairnd a '
                        '[source] section whose peer is the site A cairnd\'s '
                        'sink', volume.id, e, self._standby_name())
            return
        LOG.info('Cairn: volume %s replicates back from %s into %s/%s at site '
                 'A once its cairnd answers', volume.id, self._standby_name(),
                 self.configuration.rbd_pool, volume.name)

    def _failover_seq(self, standby, volume):
        """The restore point asked for by the volume's cairn_failover_point
        metadata: 0 (the newest) when there is none."""
        try:
            wanted = (volume.metadata or {}).get(FAILOVER_POINT_KEY)
        except Exception:  # metadata not loaded with this volume object
            wanted = None
        if wanted is None or str(wanted).strip().lower() in ('', 'latest'):
            return 0
        wanted = str(wanted).strip()
        if wanted.isdigit() and int(wanted) > 0:
            return int(wanted)
        try:
            before = _parse_time(wanted)
        except ValueError as e:
            raise _PointChoiceError(
                'its %s metadata %r is neither a restore point number, '
                '"latest", nor an ISO 8601 time with a zone (%s)'
                % (FAILOVER_POINT_KEY, wanted, e))
        points = [p for p in standby.points(volume.id)
                  if p.source_time_ns <= before]
        if not points:
            raise _PointChoiceError(
                'it has no restore point taken at or before %s (its %s '
                'metadata); see `cairn points %s` at site B'
                % (wanted, FAILOVER_POINT_KEY, volume.id))
        return max(points, key=lambda p: (p.source_time_ns, p.seq)).seq

    def _failback_volume(self, standby, volume):
        data = _load_driver_data(volume)
        cairn = self._is_cairn_volume(volume)
        # A volume that was not failed over (failover-error or not
        # replicated) was never used at site B: its image at site A is as
        # it was, so it gets its status back.
        restore = ({'status': volume.previous_status or 'available'}
                   if volume.status == 'error' and
                   volume.replication_status in (FAILOVER_ERROR, NOT_CAPABLE)
                   else {})
        if not cairn:
            return {'volume_id': volume.id,
                    'updates': dict(restore, replication_status=NOT_CAPABLE)}
        try:
            back = [v for v in standby.status(volume.id) if v.role == 'source']
        except wire.CairnError:
            back = []
        if back and not restore:
            return self._fail_back_home(standby, volume, data)
        try:
            kept = standby.release(volume.id).kept_as
        except wire.CairnError as e:
            if e.code in ('FailedPrecondition', 'NotFound'):
                LOG.info('Cairn: volume %s was not failed over at %s (%s): '
                         'nothing to release', volume.id, self._standby_name(),
                         e.message)
                return {'volume_id': volume.id,
                        'updates': dict(restore, replication_status=ENABLED,
                                        replication_driver_data=_driver_data(
                                            target=data.get('target'))),
                        }
            LOG.error('Cairn: volume %s: releasing it at %s failed: %s; it '
                      'stays fenced there (not replicated)', volume.id,
                      self._standby_name(), e)
            return self._error_update(volume, FAILOVER_ERROR)
        LOG.warning('Cairn: volume %s FAILED BACK to site A; its image at %s '
                    'is kept as %s (writes made there while failed over are in '
                    'it, not in the volume); replication from site A resumes',
                    volume.id, self._standby_name(), kept or '(it was gone)')
        return {'volume_id': volume.id,
                'updates': dict(restore, replication_status=ENABLED,
                                replication_driver_data=_driver_data(
                                    target=data.get('target'),
                                    kept_as=kept or None))}

    def _fail_back_home(self, standby, volume, data):
        """cairn failback: the final delta from site B (every write made
        there, the volume detached), then site A's image is the primary
        again and replication from A resumes as a delta."""
        timeout = self.configuration.cairn_failback_timeout
        try:
            want = standby.replicate(volume.id).seq
            have = standby.wait_for_point(volume.id, want, timeout)
            reply = wire.ControlClient(standby.socket_path, timeout).failback(
                volume.id, have)
        except wire.CairnError as e:
            LOG.error('Cairn: volume %s is NOT failed back: %s; it stays at '
                      '%s, which keeps replicating it back to site A: detach '
                      'it there (its writers) and fail back again', volume.id,
                      e, self._standby_name())
            return self._error_update(volume, FAILOVER_ERROR)
        LOG.warning('Cairn: volume %s FAILED BACK to site %s at restore point '
                    '%d with every write made at %s; replication from site A '
                    'resumes as a delta; the image there is kept as %s',
                    volume.id, reply.primary_site, reply.seq,
                    self._standby_name(), reply.kept_as)
        return {'volume_id': volume.id,
                'updates': {'replication_status': ENABLED,
                            'replication_driver_data': _driver_data(
                                target=data.get('target'), seq=reply.seq,
                                kept_as=reply.kept_as or None)}}

    def _warn_if_source_down(self):
        try:
            self._source().status()
        except wire.CairnError as e:
            LOG.warning('Cairn: failed back, but the site A cairnd does not '
                        'answer (%s): replication resumes once it runs', e)

    # -- stats ---------------------------------------------------------------

    def _update_volume_stats(self):
        super()._update_volume_stats()
        stats = self._stats
        stats['replication_enabled'] = self._is_replication_enabled
        if self._is_replication_enabled:
            stats['replication_targets'] = self._target_names
        stats.update(self._cairn_stats())

    def _cairn_stats(self):
        """cairn_state: ok, error (a volume's replication fails),
        disconnected (site B cannot be reached), down (the site A cairnd
        does not answer), failed-over. cairn_lag_seconds: the largest lag
        (now - source time of the newest restore point) over this backend's
        volumes that have a point; None when none has one or cairnd is
        down."""
        if self._failed_over():
            return {'cairn_state': 'failed-over', 'cairn_lag_seconds': None}
        try:
            volumes = self._source().status()
        except wire.CairnError as e:
            LOG.warning('Cairn: no replication figures for backend %s: %s',
                        self._backend_name, e)
            return {'cairn_state': 'down', 'cairn_lag_seconds': None}
        mine = self._mine(volumes)
        lags = [v.lag_seconds for v in mine if v.last_seq > 0]
        states = {v.state for v in mine}
        state = ('error' if 'error' in states
                 else 'disconnected' if 'disconnected' in states else 'ok')
        stats = {'cairn_state': state,
                 'cairn_lag_seconds': round(max(lags), 3) if lags else None,
                 'cairn_volumes': len(mine),
                 'cairn_volumes_without_point': len(mine) - len(lags)}
        if any(_broken(v) for v in mine):
            # Cinder's manager then asks get_replication_error_status.
            stats['replication_status'] = ERROR
        return stats

    def _mine(self, volumes):
        return [v for v in volumes
                if v.role == 'source' and v.pool == self.configuration.rbd_pool]

    def get_replication_error_status(self, context, groups):
        """The volumes whose replication is broken (their source at site A
        in error, or failing with no restore point made yet) as error, the
        others with a point as enabled again. Returns (group updates,
        volume updates), as Cinder's manager unpacks them."""
        if self._failed_over():
            return [], []
        try:
            mine = self._mine(self._source().status())
        except wire.CairnError as e:
            LOG.warning('Cairn: cannot tell which volumes fail: %s', e)
            return [], []
        updates = []
        for v in mine:
            if _broken(v):
                LOG.error('Cairn: replication of volume %s is broken: %s',
                          v.volume, v.error or v.state)
                updates.append({'volume_id': v.volume, 'replication_status': ERROR})
            elif v.last_seq > 0:
                updates.append({'volume_id': v.volume, 'replication_status': ENABLED})
        return [], updates
