#include "sharer/dedicated_fetch.hpp"

#include <steward/error.hpp>
#include <steward/io/backend_probe.hpp>
#include <steward/io/detail/scm_rights.hpp>

#include "sharer/fetch_connect.hpp"
#include "sharer/native_protocol.hpp"
#include "sharer/native_stream.hpp"
#include "sharer/quick_connect.hpp"
#include "sharer/random.hpp"
#include "sharer/sharer_handshake.hpp"
#include "sharer/sharer_wire.hpp"

#include <asio/append.hpp>
#include <asio/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/dispatch.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <sys/socket.h>

namespace steward::detail {
namespace {

using clock = std::chrono::steady_clock;
constexpr auto use_tuple = asio::as_tuple(asio::use_awaitable);
constexpr std::uint64_t request_id = 1;  // the only request of the connection

class dedicated_fetch : public std::enable_shared_from_this<dedicated_fetch> {
public:
    dedicated_fetch(const asio::any_io_executor& ex, const share_id& id, const authkey& key,
                    const fetch_options& options, fetch_handler handler)
        : socket_(ex),
          connect_pause_(ex),
          address_(id.address()),
          share_key_(id.key()),
          key_(key),
          options_(options),
          handler_(std::move(handler)) {}

    static void start(std::shared_ptr<dedicated_fetch> self) {
        auto slot = asio::get_associated_cancellation_slot(self->handler_);
        if (slot.is_connected()) {
            slot.assign([weak = std::weak_ptr<dedicated_fetch>(self)](asio::cancellation_type type) {
                if ((type & asio::cancellation_type::terminal) == asio::cancellation_type::none) return;
                if (auto me = weak.lock()) {
                    me->cancelled_ = true;
                    std::error_code ignored;
                    me->socket_.cancel(ignored);
                    me->connect_pause_.cancel();
                }
            });
        }
        const asio::any_io_executor ex = self->socket_.get_executor();
        asio::co_spawn(ex, run(std::move(self)), asio::detached);
    }

private:
    enum class state { quick_sent, hello_sent, ready };

    static asio::awaitable<void> run(std::shared_ptr<dedicated_fetch> self) {
        std::vector<unique_fd> fds;
        std::error_code ec;
        try {
            ec = co_await self->exchange(fds);
        } catch (const std::system_error& e) {
            ec = e.code();
        } catch (const std::bad_alloc&) {
            ec = std::make_error_code(std::errc::not_enough_memory);
        }
        if (ec) fds.clear();
        if (self->cancelled_) {
            // The reply may have come: without a CONFIRM the server puts the share back.
            ec = asio::error::operation_aborted;
            fds.clear();
        }
        self->deadline_.reset();
        std::error_code ignored;
        self->socket_.close(ignored);
        auto slot = asio::get_associated_cancellation_slot(self->handler_);
        if (slot.is_connected()) slot.clear();
        asio::dispatch(asio::append(std::move(self->handler_), ec, std::move(fds)));
    }

    // Everything between connect and close; the reply's descriptors land in @p out.
    asio::awaitable<std::error_code> exchange(std::vector<unique_fd>& out) {
        if (std::error_code ec = io::io_uring_status()) co_return ec;  // cached per process
        deadline_.emplace(socket_, options_.handshake_timeout + options_.reply_timeout, shared_from_this());
        if (std::error_code ec = co_await client::connect(socket_, address_, options_.handshake_timeout,
                                                          connect_pause_, [this] { return cancelled_; }))
            co_return ec;
        uid_t server_uid = 0;
        if (std::error_code ec = client::peer_uid(socket_.native_handle(), server_uid)) co_return ec;

        std::vector<std::byte> request;
        std::optional<quick::ack_reader> ack;
        quick::nonce nonce{};
        if (quick::peer_allows_quick(server_uid)) {
            std::error_code ec;
            fill_random_buffered(nonce, ec);
            if (ec) co_return ec;
            quick::request q;
            q.client_nonce = nonce;
            q.first_fetch = native::fetch{request_id, share_key_};
            quick::append_request_frame(request, key_, q);
            ack.emplace(key_, nonce);
            state_ = state::quick_sent;
        } else {
            // A server of another uid sees nothing but the CPython handshake first.
            deadline_->arm();
            std::error_code ec = co_await fast_handshake::run(socket_, auth::handshake::role::client, key_,
                                                              options_.handshake_timeout, shared_from_this());
            if (ec == asio::error::eof || ec == asio::error::connection_reset ||
                ec == asio::error::broken_pipe)
                ec = errc::authentication_failed;  // a server that refuses the peer closes before its
                                                   // challenge
            if (ec) co_return deadline_->translate(wire::normalize(ec));
            native::append_frame(request, native::hello{1, quick::max_version, 0});
            const std::size_t at = request.size();
            request.resize(at + wire::fetch_frame_size);
            wire::put_fetch(request.data() + at, request_id, share_key_);
            state_ = state::hello_sent;
        }
        if (std::error_code ec = co_await fast_handshake::send_exactly(socket_, request)) {
            const bool closed = ec == std::errc::broken_pipe || ec == std::errc::connection_reset;
            if (!closed || state_ != state::quick_sent || deadline_->expired() || cancelled_) {
                if (ec == std::errc::broken_pipe) ec = std::make_error_code(std::errc::connection_reset);
                co_return deadline_->translate(wire::normalize(ec));
            }
            // The server closed at once (a connection over its limit): what it wrote first, an
            // ERROR saying why, is still readable, and the reads below report it (or the close).
            ::shutdown(socket_.native_handle(), SHUT_WR);
        }

        // Filled by each recvmsg and emptied right after it (no suspension in between).
        thread_local const io::detail::scm_rights_control control =
            io::detail::scm_rights_control::for_receive();
        std::array<std::byte, 1024> raw;  // NOLINT(cppcoreguidelines-pro-type-member-init): written by recv
        std::vector<unique_fd> batch;
        std::vector<unique_fd> held;  // descriptors that came before QUICK_ACK was complete
        for (;;) {
            // Whatever is decoded already.
            std::error_code ec;
            while (auto ev = decoder_.next(ec)) {
                if (std::error_code r = handle(std::move(*ev), out)) co_return r;
                if (done_) co_return co_await finish_exchange();
            }
            if (ec) co_return ec;
            batch.clear();
            const bool before_ack = state_ == state::quick_sent;
            const std::span<std::byte> room = before_ack ? std::span<std::byte>(raw) : decoder_.prepare(4096);
            const io::detail::attempt_result r =
                io::detail::recv_attempt(socket_.native_handle(), asio::buffer(room.data(), room.size()),
                                         control, io::detail::socket_kind::stream, batch);
            if (r.would_block) {
                deadline_->arm();
                auto [wec] = co_await socket_.async_wait(asio::socket_base::wait_read, use_tuple);
                // A wait that reports the peer's reset: what it wrote before is still readable.
                if (wec == asio::error::operation_aborted || deadline_->expired() || cancelled_)
                    co_return deadline_->translate(wire::normalize(wec));
                continue;
            }
            const bool truncated = r.ec == errc::control_truncated;
            if ((r.ec && !truncated && r.ec != errc::unexpected_control) || r.bytes == 0) {
                // After the handshake, a close before HELLO_ACK is the server's refusal; before
                // QUICK_ACK a refusing server says so (ERROR), a bare close is a lost connection.
                if (state_ == state::hello_sent) co_return make_error_code(errc::authentication_failed);
                co_return r.ec&& r.ec != asio::error::eof ? wire::normalize(r.ec)
                                                          : std::make_error_code(std::errc::connection_reset);
            }
            if (!before_ack) {
                decoder_.commit(r.bytes, std::move(batch), truncated);
                batch = std::vector<unique_fd>();
                continue;
            }
            // The MAC of QUICK_ACK is checked before any descriptor is accepted: until then they
            // are only held (and closed with everything else on failure).
            if (!batch.empty()) {
                if (!held.empty()) co_return make_error_code(errc::malformed_message);
                held = std::move(batch);
                batch = std::vector<unique_fd>();
            }
            switch (ack->feed(std::span<const std::byte>(raw).first(r.bytes))) {
                case quick::ack_reader::state::need_more:
                    continue;
                case quick::ack_reader::state::failed:
                    co_return ack->error();
                case quick::ack_reader::state::acked:
                    break;
            }
            state_ = state::ready;
            decoder_.set_version(ack->ack().version);
            const auto rest = ack->rest();
            if (rest.empty() && !held.empty()) co_return make_error_code(errc::malformed_message);
            if (!rest.empty()) {
                const std::span<std::byte> dst = decoder_.prepare(rest.size());
                std::memcpy(dst.data(), rest.data(), rest.size());
                decoder_.commit(rest.size(), std::move(held), truncated);
                held = std::vector<unique_fd>();
            }
        }
    }

    std::error_code handle(native::stream_decoder::event ev, std::vector<unique_fd>& out) {
        if (auto* ack = std::get_if<native::hello_ack>(&ev.msg)) {
            if (state_ != state::hello_sent) return make_error_code(errc::malformed_message);
            decoder_.set_version(ack->version);
            state_ = state::ready;
            return {};
        }
        if (auto* part = std::get_if<native::reply>(&ev.msg)) {
            if (state_ != state::ready) return make_error_code(errc::malformed_message);
            std::error_code ec;
            auto done = assembler_.add(*part, std::move(ev.fds), ev.truncated, ec);
            if (ec) return ec;
            if (!done) return {};
            if (done->request_id != request_id) return make_error_code(errc::malformed_message);
            done_ = true;
            switch (done->status) {
                case native::reply_status::ok:
                    if (done->error) {
                        native::append_frame(
                            tail_,
                            native::give_back{request_id, native::give_back_reason::control_truncated});
                        result_ = done->error;
                    } else {
                        native::append_frame(tail_, native::confirm{request_id, {}});
                        out = std::move(done->fds);
                    }
                    return {};
                case native::reply_status::not_available:
                    result_ = errc::share_not_available;
                    return {};
                case native::reply_status::busy:
                case native::reply_status::server_error:
                    result_ = errc::limit_exceeded;
                    return {};
            }
            return make_error_code(errc::malformed_message);
        }
        if (auto* err = std::get_if<native::error>(&ev.msg)) {
            if (static_cast<std::uint16_t>(err->code) == quick::error_authentication_failed)
                return make_error_code(errc::authentication_failed);
            return err->code == native::error_code_value::limit_exceeded
                       ? std::error_code(errc::limit_exceeded)
                       : std::make_error_code(std::errc::connection_reset);
        }
        return make_error_code(errc::malformed_message);
    }

    // The CONFIRM (or GIVE_BACK) goes out before the fetch completes: a caller that exits right
    // after must not leave the delivery unconfirmed (the server would offer the share again).
    asio::awaitable<std::error_code> finish_exchange() {
        if (!tail_.empty()) {
            const wire::attempt a = wire::send_with_fds(socket_.native_handle(), tail_, {});
            if (a.err == EAGAIN || (a.err == 0 && a.bytes < tail_.size())) {
                const std::size_t sent = a.err == 0 ? a.bytes : 0;
                (void)co_await fast_handshake::send_exactly(socket_, std::span(tail_).subspan(sent));
            }
        }
        co_return result_;
    }

    local_socket socket_;
    asio::steady_timer connect_pause_;  // a full backlog's retry pause (cancelled with the fetch)
    std::string address_;
    share_key share_key_;
    authkey key_;
    fetch_options options_;
    fetch_handler handler_;
    std::optional<fast_handshake::socket_deadline> deadline_;
    native::stream_decoder decoder_;
    native::reply_assembler assembler_;
    state state_ = state::hello_sent;
    bool cancelled_ = false;
    bool done_ = false;
    std::error_code result_;
    std::vector<std::byte> tail_;
};

}  // namespace

void start_dedicated_fetch(const asio::any_io_executor& executor, const share_id& id, const authkey& key,
                           const fetch_options& options, fetch_handler handler) {
    dedicated_fetch::start(std::make_shared<dedicated_fetch>(executor, id, key, options, std::move(handler)));
}

}  // namespace steward::detail
