"""Cinder generic volume group replication (groups whose type has
consistent_group_replication_enabled='<is> True') on Cairn's consistency
groups: the group's volumes replicate at one instant.

- enable_replication makes the RBD group `group-<group id>` in the
  backend's pool at site A (if absent), adds every volume's image to it and
  registers each volume with the site A cairnd as a member of the Cairn
  group of that name; a volume that replicated on its own moves in, from
  its own newest point (no resync).
- failover_replication promotes, at site B, the group's newest group point
  that holds every volume: each volume's image there (the name Cinder uses)
  holds the same instant, all or none; they then replicate back to site A
  as one group (its instants taken at site B). While the group is failed
  over and the backend is not, its volumes attach at site B, and what
  would act on their stale images at site A (snapshots, extend, clones,
  upload to an image, revert) is refused. Failback ('default') brings
  every volume home at one group point with every write made at site B.
- disable_replication takes the volumes out of the group: each of a
  replicated volume type replicates on its own again, the others are
  unregistered; the RBD group goes.

Thread-safety: as the driver (groups.py is a mixin of CairnRBDDriver).
"""
import json

from oslo_log import log as logging

from cinder import exception
from cinder.objects import fields
from cinder.volume import group_types
from cinder.volume.drivers import rbd

from cairn_cinder import wire

LOG = logging.getLogger(__name__)

ENABLED = fields.ReplicationStatus.ENABLED
ERROR = fields.ReplicationStatus.ERROR
DISABLED = fields.ReplicationStatus.DISABLED
FAILED_OVER = fields.ReplicationStatus.FAILED_OVER


def cairn_group_name(group):
    """The RBD group at site A and Cairn's consistency group of a Cinder
    group."""
    return 'group-%s' % group.id


class GroupReplicationMixin:
    """enable/disable/failover_replication of CairnRBDDriver."""

    def _group_error(self, group, reason):
        return exception.ReplicationGroupError(group_id=group.id,
                                               reason='Cairn: ' + reason)

    def _refuse_if_failed_over(self, group, what):
        if self._failed_over():
            raise self._group_error(group, (
                'backend %s is failed over to %s: group replication can be %s '
                'only after failback' % (self._backend_name,
                                         self._active_backend_id, what)))

    def _rbd_group_add(self, name, volumes):
        """Makes RBD group `name` (if absent) holding every volume's image."""
        lib = rbd.rbd
        with rbd.RADOSClient(self) as client:
            try:
                lib.RBD().group_create(client.ioctx, name)
            except lib.ObjectExists:
                pass
            g = lib.Group(client.ioctx, name)
            have = {i['name'] for i in g.list_images()}
            for v in volumes:
                if v.name not in have:
                    g.add_image(client.ioctx, v.name)

    def _rbd_group_remove(self, name, volumes=None):
        """Takes `volumes`' images out of RBD group `name`, or removes the
        group (its snapshots with it) if volumes is None."""
        lib = rbd.rbd
        with rbd.RADOSClient(self) as client:
            try:
                if volumes is None:
                    lib.RBD().group_remove(client.ioctx, name)
                    return
                g = lib.Group(client.ioctx, name)
                have = {i['name'] for i in g.list_images()}
                for v in volumes:
                    if v.name in have:
                        g.remove_image(client.ioctx, v.name)
            except lib.ObjectNotFound:
                pass

    def _leave_group(self, src, v):
        """Out of its group: on its own schedule again if its volume type
        asks for replication, else no longer replicated (its points at
        site B stay)."""
        if self._is_replicated_type(v.volume_type):
            src.register(v.id, self.configuration.rbd_pool, v.name,
                         target_image=self._target_image(v),
                         **self._retention_args(v))
            return
        try:
            src.unregister(v.id, remove_snapshots=True)
        except wire.CairnError as e:
            if e.code != 'NotFound':
                raise

    def _group_retention_args(self, group):
        """register_many()'s retention and snapshot_retention from its group
        type's group specs of the names a volume type's take
        (_retention_args): every member keeps the same instants."""
        if not group.group_type_id:
            return {}
        specs = group_types.get_group_type_specs(group.group_type_id)
        try:
            return {'retention': wire.retention_of_specs(specs),
                    'snapshot_retention': wire.snapshot_retention_of_specs(specs)}
        except ValueError as e:
            raise self._group_error(group, 'group type %s: %s' % (group.group_type_id, e))

    def _replicating_group(self, group):
        return group.replication_status in (ENABLED, FAILED_OVER)

    def delete_group(self, context, group, volumes):
        """The RBD group goes first (an image in one cannot be removed);
        then Cinder deletes the volumes, each unregistered as it goes."""
        self._rbd_group_remove(cairn_group_name(group))
        raise NotImplementedError()

    def update_group(self, context, group, add_volumes=None,
                     remove_volumes=None):
        """In a replicating group, volumes added join its instants (from
        their own points) and volumes removed replicate on their own again;
        then Cinder records the change."""
        if self._replicating_group(group):
            name = cairn_group_name(group)
            pool = self.configuration.rbd_pool
            src = self._source()
            try:
                if add_volumes:
                    self._rbd_group_add(name, add_volumes)
                if add_volumes:
                    src.register_many(
                        [(v.id, pool, v.name, self._target_image(v)) for v in add_volumes],
                        name, **self._group_retention_args(group))
                for v in remove_volumes or []:
                    self._leave_group(src, v)
                if remove_volumes:
                    self._rbd_group_remove(name, remove_volumes)
            except Exception as e:
                raise self._group_error(group, (
                    'the volumes of replicating group %s were not changed '
                    'in cairnd or RBD group %s/%s: %s' % (group.id, pool, name, e)))
        raise NotImplementedError()

    def enable_replication(self, context, group, volumes):
        self._refuse_if_failed_over(group, 'enabled')
        name = cairn_group_name(group)
        pool = self.configuration.rbd_pool
        try:
            self._rbd_group_add(name, volumes)
        except Exception as e:
            raise self._group_error(group, (
                'cannot make RBD group %s/%s of the volumes\' images: %s'
                % (pool, name, e)))
        if not volumes:
            return {'replication_status': ENABLED}, []
        src = self._source()
        retention = self._group_retention_args(group)
        targets = {v.id: self._target_image(v) for v in volumes}
        try:
            # All at once: the group's schedule starts once, not per volume.
            src.register_many([(v.id, pool, v.name, targets[v.id]) for v in volumes],
                              name, **retention)
        except wire.CairnError as e:
            raise self._group_error(group, (
                'cairnd at %s did not register the volumes of group %s: %s; '
                'enable replication again once this is fixed'
                % (src.socket_path, name, e)))
        updates = [{'id': v.id, 'replication_status': ENABLED,
                    'replication_driver_data': self._group_data(
                        target=targets[v.id], group=name)} for v in volumes]
        LOG.info('Cairn: group %s (%d volumes) replicates at one instant to '
                 '%s as Cairn group %s', group.id, len(volumes),
                 self._standby_name(), name)
        return {'replication_status': ENABLED}, updates

    def disable_replication(self, context, group, volumes):
        self._refuse_if_failed_over(group, 'disabled')
        name = cairn_group_name(group)
        pool = self.configuration.rbd_pool
        src = self._source()
        updates = []
        for v in volumes:
            try:
                self._leave_group(src, v)
            except wire.CairnError as e:
                raise self._group_error(group, (
                    'cairnd at %s did not take volume %s out of group %s: %s'
                    % (src.socket_path, v.id, name, e)))
            updates.append({'id': v.id, 'replication_status': DISABLED,
                            'replication_driver_data': self._group_data(
                                target=self._target_image(v))})
        try:
            self._rbd_group_remove(name)
        except Exception as e:
            LOG.warning('Cairn: RBD group %s/%s was not removed (%s); its '
                        'volumes replicate on their own', pool, name, e)
        LOG.info('Cairn: group %s no longer replicates at one instant; its %d '
                 'volumes replicate on their own', group.id, len(volumes))
        return {'replication_status': DISABLED}, updates

    def failover_replication(self, context, group, volumes,
                             secondary_backend_id=None):
        if secondary_backend_id == 'default':
            return self._group_failback(group, volumes)
        if not self._is_replication_enabled:
            raise self._group_error(group, (
                'backend %s has no replication_device, so no standby site'
                % self._backend_name))
        backend_id, _remote = self._get_failover_target_config(secondary_backend_id)
        standby = self._standby()
        name = cairn_group_name(group)
        point = self._whole_group_point(group, standby, name, volumes)
        pool = self.configuration.rbd_pool
        promoted = []
        try:
            for v in volumes:
                promoted.append((v, standby.promote(v.id, v.name, seq=point.seq,
                                                    pool=pool)))
        except wire.CairnError as e:
            # All or none: the members promoted go back to being standbys.
            for v, _reply in reversed(promoted):
                try:
                    standby.release(v.id)
                except wire.CairnError as undo:
                    LOG.error('Cairn: volume %s stays promoted at %s after the '
                              'failover of group %s failed: %s', v.id,
                              self._standby_name(), group.id, undo)
            raise self._group_error(group, (
                'group %s is NOT failed over: promoting group point %d of '
                'volume %s at %s failed: %s' % (group.id, point.seq, v.id,
                                                self._standby_name(), e)))
        self._replicate_group_back(group, standby, name, promoted)
        updates = []
        for v, reply in promoted:
            updates.append({'id': v.id, 'replication_status': FAILED_OVER,
                            'replication_driver_data': self._group_data(
                                target=self._target_image(v), group=name,
                                seq=point.seq, site=backend_id)})
        LOG.warning('Cairn: group %s FAILED OVER to %s at group point %d, '
                    'every volume at the one instant taken at site A at %s',
                    group.id, self._standby_name(), point.seq,
                    self._iso(point.source_time_ns))
        return {'replication_status': FAILED_OVER}, updates

    def _replicate_group_back(self, group, standby, name, promoted):
        """The promoted volumes replicate back into their images at site A
        as one group (its instants taken at site B), so that site A gets
        group points and failback brings every volume home at one. If
        site B's cairnd cannot, each replicates back on its own."""
        pool = self.configuration.rbd_pool
        try:
            retention = self._group_retention_args(group)
        except exception.ReplicationGroupError as e:
            LOG.warning('Cairn: group %s replicates back by cairnd\'s '
                        'retention rules: %s', group.id, e)
            retention = {}
        try:
            standby.group_replicate_back(
                name, [(v.id, pool, v.name) for v, _reply in promoted], **retention)
        except wire.CairnError as e:
            if isinstance(e, wire.CairndUnavailable):
                # It may have done it: a fallback would pull the volumes out.
                LOG.error('Cairn: group %s: site B\'s cairnd did not answer whether '
                          'the group replicates back (%s); see `cairn group status '
                          '%s` there', group.id, e, name)
                return
            LOG.warning('Cairn: group %s does not replicate back as a group (%s): '
                        'each volume replicates back on its own, and fails back '
                        'on its own', group.id, e)
            for v, reply in promoted:
                self._replicate_back(standby, v, reply)
            return
        LOG.info('Cairn: group %s replicates back from %s into %s at site A, '
                 'its %d volumes at one instant', group.id, self._standby_name(),
                 pool, len(promoted))

    def _whole_group_point(self, group, standby, name, volumes):
        """The newest group point of `name` at site B that holds every
        volume of the group."""
        try:
            points = standby.group_points(name)
        except wire.CairnError as e:
            raise self._group_error(group, (
                'group %s is NOT failed over: it has no group point at %s '
                '(%s)' % (group.id, self._standby_name(), e)))
        ids = {v.id for v in volumes}
        whole = [p for p in points if ids <= set(p.volumes)]
        if not whole:
            raise self._group_error(group, (
                'group %s is NOT failed over: no group point at %s holds all '
                'of its %d volumes yet (`cairn group points %s` there)'
                % (group.id, self._standby_name(), len(ids), name)))
        return whole[-1]

    def _group_failback(self, group, volumes):
        standby = self._standby()
        name = cairn_group_name(group)
        try:
            back = standby.group_status(name)
        except wire.CairnError as e:
            if e.code != 'NotFound':  # not known: never guess volume by volume
                raise self._group_error(group, (
                    'group %s is NOT failed back: cannot tell how it replicates '
                    'back from %s: %s' % (group.id, self._standby_name(), e)))
            back = []  # not replicating back as a group: volume by volume
        if back:
            return self._group_failback_at_one_point(group, volumes, standby, name)
        updates = []
        for v in volumes:
            u = self._failback_volume(standby, v)
            updates.append(dict(u['updates'], id=v.id))
        bad = [u['id'] for u in updates if u.get('status') == 'error']
        if bad:
            LOG.error('Cairn: group %s: volumes %s did NOT fail back',
                      group.id, ', '.join(bad))
        return {'replication_status': ERROR if bad else ENABLED}, updates

    def _group_failback_at_one_point(self, group, volumes, standby, name):
        """Every volume's final delta at one instant of the group at site
        B, then all handed back at that group point."""
        timeout = self.configuration.cairn_failback_timeout
        try:
            done = wire.ControlClient(standby.socket_path, timeout).group_failback(
                name, timeout)
        except wire.CairnError as e:
            # Cinder marks the group error; its volumes stay failed-over
            # (they live at site B, and attach there).
            LOG.error('Cairn: group %s is NOT failed back: %s; it stays at %s, '
                      'which keeps replicating it back to site A: detach its '
                      'volumes there (their writers), then fail back again',
                      group.id, e, self._standby_name())
            return {'replication_status': ERROR}, [
                {'id': v.id, 'replication_status': FAILED_OVER} for v in volumes]
        kept = {image.rsplit('/', 1)[-1].split('.failback-')[0]: image
                for image in done.images}
        updates = []
        for v in volumes:
            data = self._load_data(v)
            updates.append({'id': v.id, 'replication_status': ENABLED,
                            'replication_driver_data': self._group_data(
                                target=data.get('target'), seq=done.seq,
                                kept_as=kept.get(v.name))})
        LOG.warning('Cairn: group %s FAILED BACK to site %s at group point %d, '
                    'every volume with every write made at %s', group.id,
                    done.primary_site, done.seq, self._standby_name())
        return {'replication_status': ENABLED}, updates

    # -- a group failed over on its own: its volumes live at site B -------

    def _refuse_at_site_a(self, volume, what):
        """Refuses to act at site A on a volume of a group failed over on
        its own: its image there is stale (site B's writes are not in it)."""
        if (volume is None or self._failed_over()
                or volume.replication_status not in (FAILED_OVER, ERROR)
                or not self._load_data(volume).get('site')):
            return
        raise exception.ReplicationError(volume_id=volume.id, reason=(
            'Cairn: volume %s cannot be %s: its group is failed over to %s, '
            'where it is written; its image at site A is stale. Fail the '
            'group back first (cinder group-failover-replication GROUP '
            '--secondary-backend-id default)' % (volume.id, what,
                                                 self._standby_name())))

    def create_snapshot(self, snapshot):
        self._refuse_at_site_a(snapshot.volume, 'snapshotted')
        return super().create_snapshot(snapshot)

    def extend_volume(self, volume, new_size):
        self._refuse_at_site_a(volume, 'extended')
        return super().extend_volume(volume, new_size)

    def create_cloned_volume(self, volume, src_vref):
        self._refuse_at_site_a(src_vref, 'cloned')
        return super().create_cloned_volume(volume, src_vref)

    def copy_volume_to_image(self, context, volume, image_service, image_meta):
        self._refuse_at_site_a(volume, 'uploaded to an image')
        return super().copy_volume_to_image(context, volume, image_service, image_meta)

    def revert_to_snapshot(self, context, volume, snapshot):
        self._refuse_at_site_a(volume, 'reverted to a snapshot')
        return super().revert_to_snapshot(context, volume, snapshot)

    def create_group_snapshot(self, context, group_snapshot, snapshots):
        for snapshot in snapshots:
            self._refuse_at_site_a(snapshot.volume, 'snapshotted')
        return super().create_group_snapshot(context, group_snapshot, snapshots)

    def initialize_connection(self, volume, connector):
        """A volume of a group failed over on its own (the backend is not)
        attaches at the standby site."""
        data = super().initialize_connection(volume, connector)
        site = self._load_data(volume).get('site')
        if (not site or self._failed_over()
                or volume.replication_status not in (FAILED_OVER, ERROR)):
            return data
        remote = self._get_target_config(site)
        name, conf, user, secret_uuid = self._get_config_tuple(remote)
        hosts, ports = self._mon_addrs_of(remote)
        data['data'].update(hosts=hosts, ports=ports, cluster_name=name,
                            auth_enabled=user is not None,
                            auth_username=user, secret_uuid=secret_uuid)
        data['data'].pop('keyring', None)  # site A's
        LOG.debug('Cairn: volume %s attaches at %s (its group is failed '
                  'over): %s', volume.id, site, data)
        return data

    def _mon_addrs_of(self, remote):
        """The monitors of the cluster `remote` names (a replication
        target), as the parent's _get_mon_addrs finds the active one's."""
        name, conf, user, _secret = self._get_config_tuple(remote)
        args = ['ceph', 'mon', 'dump', '--format=json']
        for flag, value in (('--id', user), ('--cluster', name), ('--conf', conf)):
            if value:
                args += [flag, value]
        out, _err = self._execute(*args)
        lines = out.split('\n')
        if lines[0].startswith('dumped monmap epoch'):
            lines = lines[1:]
        hosts, ports = [], []
        for mon in json.loads('\n'.join(lines))['mons']:
            host, port = mon['addr'][:mon['addr'].rindex('/')].rsplit(':', 1)
            hosts.append(host.strip('[]'))
            ports.append(port)
        return hosts, ports
