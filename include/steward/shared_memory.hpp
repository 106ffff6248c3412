#pragma once
/// @file
/// steward::shared_memory: a POSIX shared memory segment that cannot leak.
///
/// create() registers the name with the tracker FIRST, then creates the segment
/// (shm_open(O_CREAT|O_EXCL|O_CLOEXEC), ftruncate, mmap). unlink() removes it FIRST (shm_unlink),
/// then unregisters. Between the two steps of either, a kill -9 leaves at worst a registration of a
/// name that does not exist (the tracker reports and ignores it), never an unregistered segment.
///
/// attach() maps an existing segment without registering it (so this process's tracker never
/// removes someone else's segment, CPython gh-82300) unless a tracker is passed.
///
/// Names: `abc` and `/abc` are the same segment; name() is always the `/abc` form.

#include <steward/error.hpp>
#include <steward/tracker.hpp>
#include <steward/unique_fd.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/async_result.hpp>

#include <sys/types.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <system_error>

namespace steward {

class shared_memory;

namespace detail {
void async_create_shared_memory(tracker& t, const std::string& name, std::size_t size,
                                asio::any_completion_handler<void(std::error_code, shared_memory)> handler);
}

/// A mapped POSIX shared memory segment (see the file comment). Move-only.
///
/// @par Destruction
/// Unmaps and closes. The process that created the segment (not its forked children) also unlinks
/// it, as unlink() does, when it is still tracked; an attached segment is never unlinked.
/// The tracker passed to create()/attach() must outlive the object; destroy (or unlink) tracked
/// objects before tracker::async_stop(), or their unregistration starts a new daemon.
class shared_memory {
public:
    /// No segment.
    shared_memory() noexcept = default;
    shared_memory(shared_memory&& other) noexcept;
    shared_memory& operator=(shared_memory&& other) noexcept;
    shared_memory(const shared_memory&) = delete;
    shared_memory& operator=(const shared_memory&) = delete;
    ~shared_memory();

    /// Registers @p name with @p t (blocking), then creates and maps a new segment of @p size bytes
    /// (mode 0600). Errors: those of tracker::register_resource(); std::errc::file_exists when the
    /// name is taken (the registration is withdrawn again, unless this process had registered the name
    /// before, i.e. it belongs to another live object of this process); std::errc::invalid_argument for a
    /// name with '/' after the first byte, or size 0; other shm_open/ftruncate/mmap errors (the segment is
    /// unlinked and unregistered again). @throws std::system_error naming the segment.
    static shared_memory create(tracker& t, std::string_view name, std::size_t size);
    static shared_memory create(tracker& t, std::string_view name, std::size_t size, std::error_code& ec);

    /// As create(), registering with async_register() (the other steps are quick system calls made
    /// in the completion).
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec, steward::shared_memory shm) @endcode
    ///
    /// @par Per-Operation Cancellation
    /// Not supported.
    template <typename CompletionToken = asio::default_completion_token_t<tracker::executor_type>>
    static auto async_create(
        tracker& t, std::string_view name, std::size_t size,
        CompletionToken&& token = asio::default_completion_token_t<tracker::executor_type>()) {
        return asio::async_initiate<CompletionToken, void(std::error_code, shared_memory)>(
            [&t](auto handler, const std::string& n, std::size_t s) {
                detail::async_create_shared_memory(t, n, s, std::move(handler));
            },
            token, std::string(name), size);
    }

    /// Maps an existing segment (its whole current size) WITHOUT registering it.
    static shared_memory attach(std::string_view name);
    static shared_memory attach(std::string_view name, std::error_code& ec);
    /// Maps an existing segment and registers it with @p t (this process's family then removes it).
    static shared_memory attach(tracker& t, std::string_view name);
    static shared_memory attach(tracker& t, std::string_view name, std::error_code& ec);

    /// shm_unlink, then unregister (when tracked). The mapping stays usable. Unlinking twice, or a
    /// segment already removed by someone else: std::errc::no_such_file_or_directory (still
    /// unregistered).
    void unlink();
    void unlink(std::error_code& ec);

    [[nodiscard]] bool valid() const noexcept { return data_ != nullptr; }
    [[nodiscard]] void* data() const noexcept { return data_; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    /// The canonical name ("/abc").
    [[nodiscard]] const std::string& name() const noexcept { return name_; }
    /// The segment's descriptor (CLOEXEC).
    [[nodiscard]] int fd() const noexcept { return fd_.get(); }
    /// True while this object's tracker has the name registered.
    [[nodiscard]] bool tracked() const noexcept { return tracker_ != nullptr; }

    /// `abc` -> `/abc`; `/abc` unchanged.
    [[nodiscard]] static std::string canonical_name(std::string_view name);

private:
    friend void detail::async_create_shared_memory(
        tracker&, const std::string&, std::size_t,
        asio::any_completion_handler<void(std::error_code, shared_memory)>);
    static shared_memory create_registered(tracker& t, std::string name, std::size_t size, bool withdraw,
                                           std::error_code& ec);
    static shared_memory open_existing(tracker* t, std::string_view name, std::error_code& ec);
    void reset() noexcept;

    std::string name_;
    unique_fd fd_;
    void* data_ = nullptr;
    std::size_t size_ = 0;
    tracker* tracker_ = nullptr;  // set while registered by this object
    pid_t creator_ = -1;          // pid that created the segment (-1: attached)
};

}  // namespace steward
