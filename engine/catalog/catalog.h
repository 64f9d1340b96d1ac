// Catalog: the restore points of every volume a sink holds, kept in a
// KvStore (on site B: the omap of the object "cairn.catalog" in each
// standby pool), so that the record of what exists survives the node that
// wrote it.
//
// Keys:   point/<volume>/<seq, 20 digits>  ->  EncodeRestorePoint(...)
//         owner/<pool>/<image>             ->  volume id
//         instance/sink                    ->  EncodeSinkInstance(...)
//         groupmember/<group>/<seq>/<volume> -> the member's point (as point/):
//                                          the group points derive from them
// Values: [u8 version=1][protobuf RestorePoint][u64 XXH3-64 of the bytes
//         before it, little-endian]. A value that fails its checksum is
//         reported as kDataLoss naming its key, never silently skipped.
//         instance/sink is [u8 version=1]["name=value\n" lines][u64 XXH3-64].
//
// Thread-safety: a Catalog is as thread-safe as its KvStore.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/base/checksum.h"
#include "engine/base/status.h"
#include "engine/catalog/kv_store.h"
#include "engine/catalog/sink_lock.h"
#include "engine/epoch/epoch_id.h"

namespace cairn {
namespace pb {
class RestorePoint;
}

inline constexpr char kCatalogObject[] = "cairn.catalog";

// An epoch applied at the standby site: the snapshot `snap` of `image`.
// The last verify of a restore point: its blocks compared by digest with
// the source snapshot it came from (cairn verify).
struct PointVerification {
  int64_t recorded_ns = 0;  // when the sink recorded it
  uint64_t compared_bytes = 0;
  uint64_t mismatched_grains = 0;  // 0: the point equals its source
  uint32_t grain = 0;
  friend bool operator==(const PointVerification&, const PointVerification&) = default;
};

struct RestorePoint {
  EpochId epoch;
  int64_t created_time_ns = 0;  // when the sink made the restore point
  std::string pool;
  std::string image;
  std::string snap;
  uint64_t data_bytes = 0;
  uint64_t zero_bytes = 0;
  EpochDigest epoch_digest;
  ChainDigest chain_digest;
  // Kept in a record of its own (Catalog::SetVerification), filled in by
  // Points and Get; never part of the point's record.
  std::optional<PointVerification> verification;
  // The images that hold the point against retention (drill clones,
  // Catalog::AddHold), filled in by Points and Get.
  std::vector<std::string> held_by;
  friend bool operator==(const RestorePoint&, const RestorePoint&) = default;
};

// A consistency group's restore point: every member volume has its point
// of the group's instant `seq` (all taken at once at the source).
struct GroupPoint {
  std::string group;
  uint64_t seq = 0;
  int64_t source_time_ns = 0;        // the latest of the members' snapshot times
  std::vector<std::string> volumes;  // sorted
  friend bool operator==(const GroupPoint&, const GroupPoint&) = default;
};

// The point as protobuf: the body of its catalog record, and what the
// control socket reports.
void RestorePointToProto(const RestorePoint& p, pb::RestorePoint* m);
std::string EncodeRestorePoint(const RestorePoint& p);
// kDataLoss (naming `what`) on a malformed digest.
StatusOr<RestorePoint> RestorePointFromProto(const pb::RestorePoint& m, std::string_view what);
// kDataLoss on a bad version, checksum or protobuf; `key` names the record
// in the error.
StatusOr<RestorePoint> DecodeRestorePoint(std::string_view bytes, std::string_view key);

// Volume ids are used in keys, snapshot and file names: 1..128 chars of
// [A-Za-z0-9._-], not starting with '.'. kInvalidArgument otherwise.
Status ValidateVolumeId(std::string_view volume);

// The standby snapshot name of epoch `seq`: "cairn.<seq>".
std::string SnapName(uint64_t seq);
// The seq of a "cairn.<seq>" snapshot name, or nullopt.
std::optional<uint64_t> ParseSnapName(std::string_view snap);

// The sink cairnd that last started on a catalog, recorded so that the
// next one can say in its log whom it fenced (FenceAndRegisterSink fences
// the holder of the sink lock, never what this record names).
struct SinkInstance {
  std::string addr;  // its RADOS client address, e.g. "127.0.0.1:0/3215435001"
  std::string site;
  std::string host;
  int64_t pid = 0;
  std::string boot_id;     // of its host (Linux: /proc/sys/kernel/random/boot_id)
  int64_t started_ns = 0;  // unix ns
  friend bool operator==(const SinkInstance&, const SinkInstance&) = default;
};

// Unknown names are skipped when decoding (a newer cairnd may add some);
// newlines in values are replaced by spaces. kDataLoss, naming `key`, on a
// bad checksum or a record without an address.
std::string EncodeSinkInstance(const SinkInstance& s);
StatusOr<SinkInstance> DecodeSinkInstance(std::string_view bytes, std::string_view key);
// "ADDR (cairnd pid P on host H, site S, started 2026-11-25T04:50:15Z)", for
// logs; "ADDR (no instance record describes it)" for a bare address.
std::string DescribeSinkInstance(const SinkInstance& s);

class Catalog {
 public:
  explicit Catalog(KvStore& kv) : kv_(kv) {}

  // A point of a group's instant (p.epoch.group) is also recorded, in the
  // same commit, as a member of it: once every member of the instant
  // (group_members, one source site) has its point, the group point
  // exists, made by the last member's commit; it exists only whole.
  Status AddPoint(const RestorePoint& p);
  // Also forgets the point's verification and its group membership (the
  // group point of its instant is no longer whole).
  Status RemovePoint(std::string_view volume, uint64_t seq);

  // The group points of `group`, oldest first.
  StatusOr<std::vector<GroupPoint>> GroupPoints(std::string_view group);
  // kNotFound "group G has no restore point N" if absent.
  StatusOr<GroupPoint> GetGroupPoint(std::string_view group, uint64_t seq);
  // Every group with at least one group point.
  StatusOr<std::vector<std::string>> Groups();
  // Records the last verify of point `seq` (which must exist: kNotFound).
  Status SetVerification(std::string_view volume, uint64_t seq, const PointVerification& v);
  // Point `seq` (which must exist: kNotFound) is held by `image` (a drill's
  // clone of it): retention keeps it until the hold is removed.
  Status AddHold(std::string_view volume, uint64_t seq, std::string_view image);
  Status RemoveHold(std::string_view volume, uint64_t seq, std::string_view image);
  // The holds of `volume`: (seq, image), by seq.
  StatusOr<std::vector<std::pair<uint64_t, std::string>>> Holds(std::string_view volume);
  // Points of `volume`, oldest first, each with its verification.
  StatusOr<std::vector<RestorePoint>> Points(std::string_view volume);
  // The newest point, or nullopt if the volume has none.
  StatusOr<std::optional<RestorePoint>> Latest(std::string_view volume);
  // kNotFound "volume V has no restore point N" if absent.
  StatusOr<RestorePoint> Get(std::string_view volume, uint64_t seq);
  // Every volume with at least one point.
  StatusOr<std::vector<std::string>> Volumes();

  // Which volume's standby image pool/image is: recorded before the sink
  // creates the image, so that it never writes over an image it did not
  // create. Empty string if none.
  Status SetImageOwner(std::string_view pool, std::string_view image, std::string_view volume);
  StatusOr<std::string> ImageOwner(std::string_view pool, std::string_view image);
  // Planned failback: pool/image, the standby of `volume` here, is its
  // primary again. Forgets, in one commit, the volume's points (their
  // snapshots stay on the image), the image's owner and any Resolution.
  Status HandBack(std::string_view volume, std::string_view pool, std::string_view image);

  // A volume failed over at this site (promoted/<volume>): the point and
  // the image it was promoted into. While it is recorded the sink refuses
  // the volume's source. nullopt if not promoted.
  struct Promotion {
    uint64_t seq = 0;
    std::string pool;
    std::string image;
  };
  StatusOr<std::optional<Promotion>> GetPromotion(std::string_view volume);
  Status SetPromotion(std::string_view volume, const Promotion& p);
  // Also forgets the volume's Resolution.
  Status ClearPromotion(std::string_view volume);
  // The operator's choice in a split brain of `volume` (cairn resolve
  // --keep SITE, resolved/<volume>): the site whose writes win; "" if none
  // was made.
  StatusOr<std::string> Resolution(std::string_view volume);
  Status SetResolution(std::string_view volume, std::string_view site);

  // The sink instance recorded (instance/sink) and its stored bytes, or
  // nullopt if no sink ever registered here.
  struct SinkRecord {
    SinkInstance instance;
    std::string raw;
  };
  StatusOr<std::optional<SinkRecord>> SinkInstanceRecord();
  // Records `self` if the record still holds `expected_raw` (nullopt: no
  // record); kAborted, changing nothing, if another sink replaced it since.
  Status ReplaceSinkInstance(const std::optional<std::string>& expected_raw,
                             const SinkInstance& self);

 private:
  KvStore& kv_;
};

// A sink fenced by FenceAndRegisterSink, and the pools whose lock it held.
struct FencedSink {
  SinkInstance instance;  // as recorded; only `addr` if no record names it
  std::vector<std::string> pools;
};

// One pool's catalog and the sink lock on it (engine/catalog/sink_lock.h).
struct SinkCatalog {
  std::string pool;
  KvStore* kv = nullptr;
  SinkLock* lock = nullptr;
};

struct SinkRegistration {
  std::vector<FencedSink> fenced;  // in the order met
  // What was recorded but not acted on (a record naming a client that holds
  // no lock, an unreadable record), one line each, for the log.
  std::vector<std::string> warnings;
};

// Fencing at a sink's start, before it touches any standby image or spool.
// For each catalog: every other client holding its sink lock is passed to
// `fence` (once per address: it must cut that client off the cluster, e.g.
// blocklist it), its hold is broken, `self` takes the lock and replaces the
// instance record. Only a lock holder is ever fenced: the cluster says who
// holds a lock, while the instance record (host, pid, start time) is any
// pool writer's to forge, so it only describes a holder in logs. Of sinks
// started together the last to take the lock is the one left running: a
// lock taken meanwhile by another makes this one fence that one too.
// A catalog whose holder could not be fenced is left as it was and the
// error returned (annotated with the pool). self.addr must be the address
// every lock takes in.
using FenceFn = std::function<Status(const SinkInstance& previous)>;
StatusOr<SinkRegistration> FenceAndRegisterSink(const std::vector<SinkCatalog>& catalogs,
                                                const SinkInstance& self, const FenceFn& fence);

}  // namespace cairn
