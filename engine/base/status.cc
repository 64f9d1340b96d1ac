#include "engine/base/status.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>

namespace cairn {

std::string_view CodeName(Code code) {
  switch (code) {
    case Code::kOk:
      return "OK";
    case Code::kInvalidArgument:
      return "InvalidArgument";
    case Code::kNotFound:
      return "NotFound";
    case Code::kAlreadyExists:
      return "AlreadyExists";
    case Code::kPermissionDenied:
      return "PermissionDenied";
    case Code::kResourceExhausted:
      return "ResourceExhausted";
    case Code::kFailedPrecondition:
      return "FailedPrecondition";
    case Code::kAborted:
      return "Aborted";
    case Code::kInternal:
      return "Internal";
    case Code::kUnavailable:
      return "Unavailable";
    case Code::kDataLoss:
      return "DataLoss";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return fmt::format("{}: {}", CodeName(code_), message_);
}

Status Status::Annotate(std::string_view context) const {
  if (ok()) return *this;
  return Status(code_, fmt::format("{}: {}", context, message_)).WithReason(reason_);
}

Status ErrnoStatus(int negative_errno, std::string_view what) {
  const int e = negative_errno < 0 ? -negative_errno : negative_errno;
  std::string msg = fmt::format("{}: {} (errno {})", what, std::strerror(e), e);
  switch (e) {
    case ENOENT:
      return NotFound(std::move(msg));
    case EEXIST:
      return AlreadyExists(std::move(msg));
    case ENOSPC:
    case EDQUOT:
      return ResourceExhausted(std::move(msg));
    case EACCES:
    case EPERM:
      return FailedPrecondition(msg + " — check the cephx user, its key and its caps");
    case ETIMEDOUT:
    case ECONNREFUSED:
    case ECONNRESET:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EAGAIN:
      return Unavailable(std::move(msg));
    case EINTR:
    case ESHUTDOWN:
    case ECANCELED:
      return Aborted(std::move(msg));
    case EINVAL:
    case ERANGE:
      return InvalidArgument(std::move(msg));
    case EIO:
      return DataLoss(std::move(msg));
    case EBUSY:
      return FailedPrecondition(std::move(msg));
    default:
      return Internal(std::move(msg));
  }
}

}  // namespace cairn
