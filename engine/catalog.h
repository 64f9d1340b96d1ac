// Catalog: the restore points of every volume a sink holds, kept in a
// KvStore (on site B: the omap of the object "cairn.catalog" in each
// standby pool), so that the record of what exists survives the node that
// wrote it.
//
// Keys:   point/<volume>/<seq, 20 digits>  ->  EncodeRestorePoint(...)
//         owner/<pool>/<image>             ->  volume id
// Values: [u8 version=1][protobuf RestorePoint][u64 XXH3-64 of the bytes
//         before it, little-endian]. A value that fails its checksum is
//         reported as kDataLoss naming its key, never silently skipped.
//
// Thread-safety: a Catalog is as thread-safe as its KvStore.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/checksum.h"
#include "engine/kv_store.h"
#include "engine/status.h"

namespace cairn {

inline constexpr char kCatalogObject[] = "cairn.catalog";

struct RestorePoint {
  std::string volume;
  uint64_t seq = 0;
  uint64_t base_seq = 0;
  int64_t source_time_ns = 0;   // when the source snapshot was taken
  int64_t created_time_ns = 0;  // when the sink made the restore point
  std::string pool;
  std::string image;
  std::string snap;
  uint64_t image_size = 0;
  uint64_t data_bytes = 0;
  uint64_t zero_bytes = 0;
  EpochDigest epoch_digest;
  ChainDigest chain_digest;
  std::string source_site;
  friend bool operator==(const RestorePoint&, const RestorePoint&) = default;
};

std::string EncodeRestorePoint(const RestorePoint& p);
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

class Catalog {
 public:
  explicit Catalog(KvStore& kv) : kv_(kv) {}

  Status AddPoint(const RestorePoint& p);
  Status RemovePoint(std::string_view volume, uint64_t seq);
  // Points of `volume`, oldest first.
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

 private:
  KvStore& kv_;
};

}  // namespace cairn
