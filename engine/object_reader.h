// Reads of one RBD snapshot straight from the image's RADOS data objects.
//
// librbd turns every read into at least one RADOS op, so an epoch of small
// scattered changes costs the primary's OSDs one op per record. Here the
// reads of one object that are started together go out as one RADOS read
// op with one sub-read per extent, as rbd-mirror's deep copy reads an
// object: an incremental epoch of 64 KiB records over 4 MiB objects costs
// the primary several times fewer ops.
//
// Only the plain layout is read this way: no parent at the snapshot (a
// clone's unwritten objects live in its parent), the default striping, no
// separate data pool, not migrating. For any other image OpenObjectReader
// returns null and the caller reads through librbd.
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <memory>
#include <string>

#include "engine/status.h"
#include "engine/volume.h"

namespace cairn {

// `pool` is the image's pool (namespace included); `at_snap` the image
// `image` opened at snapshot `snap`; `spec` names it in errors. The reader
// owns RADOS I/O contexts of its own (one reading at the snapshot) and
// keeps nothing of `at_snap`. Returns null when the layout needs librbd
// (see above). A read of an object the snapshot does not hold fills
// zeros only once the snapshot is checked to be still there (a snapshot
// removed under the read fails it, kAborted).
StatusOr<std::unique_ptr<AsyncIo>> OpenObjectReader(rados_ioctx_t pool, rbd_image_t at_snap,
                                                    const std::string& image,
                                                    const std::string& snap,
                                                    const std::string& spec);

}  // namespace cairn
