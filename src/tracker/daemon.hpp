#pragma once
// The tracker daemon's logic, separate from its process plumbing so it can be driven in-process:
// bytes in (any chunking), warnings and the shutdown report out, an exit status at the end.
//
// Exit status (docs/tracker.md): 0 nothing leaked and no bad input; 1 leaks found and all
// cleaned; 2 a cleanup failed (or a name could not be tracked for lack of memory); 3 malformed
// input seen. Precedence 2 > 3 > 1.

#include "tracker/codec.hpp"
#include "tracker/registry.hpp"

#include <steward/unique_fd.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace steward::detail::tracking {

inline constexpr int exit_clean = 0;
inline constexpr int exit_leaks_cleaned = 1;
inline constexpr int exit_cleanup_failed = 2;
inline constexpr int exit_malformed_input = 3;

class daemon_core {
public:
    /// Warnings and the report go to @p report_fd (stderr in the daemon), written once per batch.
    explicit daemon_core(int report_fd);

    /// Processes one chunk of the stream (lines may span chunks). Performs no system call.
    void ingest(std::string_view chunk);

    /// After each read. Looks up the identity of names registered since the last lookup and
    /// still registered (one lstat each), compacts the registry when churn left it mostly dead,
    /// and writes pending warnings. The lookups run when @p input_drained (the read did not fill
    /// the buffer: the daemon is keeping up) or when the oldest waiting name has waited 50 ms;
    /// under a flood they wait, so a REGISTER/UNREGISTER pair a few reads apart costs no system
    /// call at all.
    void end_of_batch(bool input_drained = true);

    /// End of input: reports a partial last line, then the leaks, removes them and returns the
    /// exit status. Identities still waiting are not looked up: comparing the object with itself
    /// a moment later would prove nothing.
    int finish();

    [[nodiscard]] const registry& tracked() const noexcept { return registry_; }
    [[nodiscard]] std::uint64_t messages() const noexcept { return messages_; }
    [[nodiscard]] std::uint64_t malformed() const noexcept { return malformed_; }

private:
    void on_line(std::string_view line);
    void on_bad_line(decode_error error, std::string_view line);
    void flush();
    void resolve_identities();
    void observe_dev_shm();

    registry registry_;
    line_splitter splitter_;
    decode_scratch scratch_;
    std::vector<registry::handle> pending_identity_;
    std::chrono::steady_clock::time_point pending_since_;
    std::string output_;
    int report_fd_;
    std::uint64_t messages_ = 0;
    std::uint64_t malformed_ = 0;
    std::uint64_t untracked_ = 0;  // REGISTERs that failed for lack of memory
};

/// Appends a Python-repr-like quoted form of @p bytes ('name', with \n, \xNN escapes) to @p out.
void append_quoted(std::string& out, std::string_view bytes);

/// The daemon's main loop: reads @p fd until end of input, then finish(). Reads through the
/// io_uring-backed executor in 64 KiB chunks; when io_uring is unavailable (seccomp, sysctl) it
/// says so on stderr and reads with plain blocking read() instead, because a tracker that refuses
/// to run would leak everything it was meant to clean. Returns the exit status.
int run_daemon(unique_fd fd, bool allow_io_uring = true);

}  // namespace steward::detail::tracking
