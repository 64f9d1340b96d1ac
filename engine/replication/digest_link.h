// Block digests asked of a sink over a link (DigestRequest/DigestReply):
// by a resync inside an epoch, and by a verify on a link of its own.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "engine/base/status.h"
#include "engine/link/link.h"

namespace cairn {

// Asks for the digests of the sink's point `seq` over [offset, offset +
// length), one per `grain` bytes, clipped to `image_size`.
Status AskDigests(Link& link, uint64_t seq, uint64_t offset, uint64_t length, uint32_t grain,
                  uint64_t image_size);
// The answer to the AskDigests at `offset` (the sink answers in order): the
// packed digests, 16 bytes per grain. A refusal becomes its status; any
// other frame kDataLoss.
StatusOr<std::string> TakeDigests(Link& link, uint64_t offset, uint64_t length, uint32_t grain,
                                  std::chrono::milliseconds timeout);

}  // namespace cairn
