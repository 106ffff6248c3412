#pragma once
/// @file
/// steward::named_semaphore: a POSIX named semaphore that cannot leak.
///
/// Same protocol as steward::shared_memory: create() registers first, then creates the semaphore
/// (as sem_open(O_CREAT|O_EXCL) would, but written unnamed and then linked under its name, so a
/// process killed while creating it leaves no temporary file behind); unlink() calls sem_unlink
/// first, then unregisters; attach() does not register unless a tracker is passed (gh-82300).
/// `abc` and `/abc` are the same semaphore.

#include <steward/error.hpp>
#include <steward/tracker.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/async_result.hpp>

#include <semaphore.h>
#include <sys/types.h>

#include <string>
#include <string_view>
#include <system_error>

namespace steward {

class named_semaphore;

namespace detail {
void async_create_named_semaphore(
    tracker& t, const std::string& name, unsigned value,
    asio::any_completion_handler<void(std::error_code, named_semaphore)> handler);
}

/// An open POSIX named semaphore (see the file comment). Move-only.
///
/// @par Destruction
/// Closes it. The creating process (not its forked children) also unlinks it when it is still
/// tracked; an attached semaphore is never unlinked. The tracker must outlive the object; destroy (or unlink)
/// tracked objects before tracker::async_stop(), or their unregistration starts a new daemon.
class named_semaphore {
public:
    named_semaphore() noexcept = default;
    named_semaphore(named_semaphore&& other) noexcept;
    named_semaphore& operator=(named_semaphore&& other) noexcept;
    named_semaphore(const named_semaphore&) = delete;
    named_semaphore& operator=(const named_semaphore&) = delete;
    ~named_semaphore();

    /// Registers @p name with @p t (blocking), then creates the semaphore with @p value (mode 0600).
    /// Errors as shared_memory::create(). @throws std::system_error naming the semaphore.
    static named_semaphore create(tracker& t, std::string_view name, unsigned value);
    static named_semaphore create(tracker& t, std::string_view name, unsigned value, std::error_code& ec);

    /// As create(), registering with async_register().
    ///
    /// @par Completion Signature
    /// @code void(std::error_code ec, steward::named_semaphore sem) @endcode
    ///
    /// @par Per-Operation Cancellation
    /// Not supported.
    template <typename CompletionToken = asio::default_completion_token_t<tracker::executor_type>>
    static auto async_create(
        tracker& t, std::string_view name, unsigned value,
        CompletionToken&& token = asio::default_completion_token_t<tracker::executor_type>()) {
        return asio::async_initiate<CompletionToken, void(std::error_code, named_semaphore)>(
            [&t](auto handler, const std::string& n, unsigned v) {
                detail::async_create_named_semaphore(t, n, v, std::move(handler));
            },
            token, std::string(name), value);
    }

    /// Opens an existing semaphore WITHOUT registering it.
    static named_semaphore attach(std::string_view name);
    static named_semaphore attach(std::string_view name, std::error_code& ec);
    /// Opens an existing semaphore and registers it with @p t.
    static named_semaphore attach(tracker& t, std::string_view name);
    static named_semaphore attach(tracker& t, std::string_view name, std::error_code& ec);

    /// sem_unlink, then unregister (when tracked).
    void unlink();
    void unlink(std::error_code& ec);

    /// sem_post / sem_wait (retried on EINTR) / sem_trywait (false when it would block).
    void post();
    void wait();
    [[nodiscard]] bool try_wait();

    [[nodiscard]] bool valid() const noexcept { return sem_ != nullptr; }
    [[nodiscard]] sem_t* native_handle() const noexcept { return sem_; }
    [[nodiscard]] const std::string& name() const noexcept { return name_; }
    [[nodiscard]] bool tracked() const noexcept { return tracker_ != nullptr; }

private:
    friend void detail::async_create_named_semaphore(
        tracker&, const std::string&, unsigned,
        asio::any_completion_handler<void(std::error_code, named_semaphore)>);
    static named_semaphore create_registered(tracker& t, std::string name, unsigned value, bool withdraw,
                                             std::error_code& ec);
    static named_semaphore open_existing(tracker* t, std::string_view name, std::error_code& ec);
    void reset() noexcept;

    std::string name_;
    sem_t* sem_ = nullptr;
    tracker* tracker_ = nullptr;
    pid_t creator_ = -1;
};

}  // namespace steward
