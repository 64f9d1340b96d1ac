// Status and StatusOr: errors as values at module boundaries.
//
// A Status says what the caller must do, not where the error came from:
//   kUnavailable        the peer or cluster is not reachable now: retry later.
//   kAborted            the step was interrupted (cut link, peer restart):
//                       restart the step from the last durable point.
//   kDataLoss           bytes failed verification (checksum, sequence):
//                       discard them and ask for them again.
//   kInvalidArgument    the request or input is malformed: fix the input.
//   kFailedPrecondition the system is not in a state to do this: an operator
//                       must act (missing pool, wrong key, full disk...).
//   kNotFound           the named thing does not exist.
//   kAlreadyExists      the named thing exists already.
//   kPermissionDenied   the peer is not who may do this (no certificate, one
//                       not allowed for the pool or volume, a caller outside
//                       the control socket's groups): fix the grant or the
//                       caller, never retry as is.
//   kResourceExhausted  out of space or quota: free some, then retry.
//   kInternal           a bug: an invariant did not hold.
//
// Thread-safety: values; safe to copy between threads.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace cairn {

enum class Code : int {
  kOk = 0,
  kInvalidArgument = 3,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
};

std::string_view CodeName(Code code);

// Where the code alone does not say what to do: which limit was hit. A
// caller decides by this, never by the message's text.
enum class Reason : int {
  kNone = 0,
  kSpoolDiskFull,  // kResourceExhausted: the spool's file system is full
  kSpoolQuota,     // kResourceExhausted: an epoch would pass spool_max_bytes
  kSplitBrain,     // kFailedPrecondition: both sites wrote since their shared point
};

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  Reason reason() const { return reason_; }
  // The same status, with `reason` (kept by Annotate).
  Status WithReason(Reason reason) const {
    Status s = *this;
    s.reason_ = reason;
    return s;
  }
  const std::string& message() const { return message_; }
  // "DataLoss: block checksum mismatch at offset 4096"
  std::string ToString() const;

  // Prepends context: "applying epoch 7: <message>". Keeps the code.
  Status Annotate(std::string_view context) const;

 private:
  Code code_ = Code::kOk;
  Reason reason_ = Reason::kNone;
  std::string message_;
};

inline Status OkStatus() { return Status(); }
inline Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
inline Status AlreadyExists(std::string m) { return {Code::kAlreadyExists, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {Code::kResourceExhausted, std::move(m)}; }
inline Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
inline Status FailedPrecondition(std::string m) {
  return {Code::kFailedPrecondition, std::move(m)};
}
inline Status Aborted(std::string m) { return {Code::kAborted, std::move(m)}; }
inline Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }
inline Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
inline Status DataLoss(std::string m) { return {Code::kDataLoss, std::move(m)}; }

// Maps a negative errno from librbd/librados/liburing to a Status whose code
// says what the caller must do. `what` names the operation.
Status ErrnoStatus(int negative_errno, std::string_view what);

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  StatusOr(Status status) : v_(std::move(status)) {  // NOLINT
    assert(!std::get<Status>(v_).ok() && "StatusOr from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & {
    assert(ok());
    return std::get<T>(v_);
  }
  const T& value() const& {
    assert(ok());
    return std::get<T>(v_);
  }
  T&& value() && {
    assert(ok());
    return std::get<T>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace cairn

#define CAIRN_CONCAT_INNER(a, b) a##b
#define CAIRN_CONCAT(a, b) CAIRN_CONCAT_INNER(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define RETURN_IF_ERROR(expr)     \
  do {                            \
    ::cairn::Status _st = (expr); \
    if (!_st.ok()) return _st;    \
  } while (0)

// `lhs = value of expr` (a StatusOr), or returns its error.
#define ASSIGN_OR_RETURN(lhs, expr) ASSIGN_OR_RETURN_IMPL(CAIRN_CONCAT(_sor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()
