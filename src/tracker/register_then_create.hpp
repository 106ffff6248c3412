#pragma once
// The creation order shared by steward::shared_memory and steward::named_semaphore: register the
// name FIRST, then create the object. A kill -9 between the two leaves a registration of a name
// that does not exist yet (the daemon reports and ignores it), never an object nobody will remove.
// A failed create withdraws the registration again, unless the name was already registered by this
// process: then it belongs to one of its live objects and must stay.

#include <steward/error.hpp>
#include <steward/resource_type.hpp>
#include <steward/tracker.hpp>

#include <asio/any_completion_handler.hpp>
#include <asio/append.hpp>
#include <asio/dispatch.hpp>
#include <asio/post.hpp>

#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace steward::detail {

/// POSIX names of shm segments and named semaphores: "/" plus at least one character, no further
/// "/" and no NUL (the caller has already added the leading "/").
inline std::error_code check_posix_name(const std::string& canonical) {
    if (canonical.size() < 2 || canonical.find('/', 1) != std::string::npos ||
        canonical.find('\0') != std::string::npos)
        return std::make_error_code(std::errc::invalid_argument);
    return {};
}

/// Registers @p canonical with @p t, then calls `create(std::string name, bool withdraw,
/// std::error_code& ec) -> Object`, which creates the object and, when it fails and `withdraw` is
/// set, unregisters the name. @p canonical must already have passed check_posix_name().
template <typename Object, typename Create>
Object register_then_create(tracker& t, std::string canonical, resource_type type, Create&& create,
                            std::error_code& ec) {
    const bool withdraw = !t.is_registered(canonical, type);
    t.register_resource(canonical, type, ec);
    if (ec) return Object();
    return std::forward<Create>(create)(std::move(canonical), withdraw, ec);
}

/// The asynchronous form: @p bad is the result of validating the arguments (reported through a
/// post, nothing registered); otherwise the registration is awaited with tracker::async_register and
/// `create` runs in its completion. @p handler is invoked through the tracker's executor.
template <typename Object, typename Create>
void async_register_then_create(tracker& t, std::string canonical, resource_type type, std::error_code bad,
                                Create create,
                                asio::any_completion_handler<void(std::error_code, Object)> handler) {
    if (bad) {
        asio::post(t.get_executor(), asio::append(std::move(handler), bad, Object()));
        return;
    }
    const std::string key = canonical;  // async_register copies it; the lambda keeps canonical
    const bool withdraw = !t.is_registered(canonical, type);
    t.async_register(key, type,
                     [&t, canonical = std::move(canonical), withdraw, create = std::move(create),
                      h = std::move(handler)](std::error_code ec) mutable {
                         Object object;
                         if (!ec) object = create(std::move(canonical), withdraw, ec);
                         asio::dispatch(t.get_executor(), asio::append(std::move(h), ec, std::move(object)));
                     });
}

/// @p object when @p ec is clear; otherwise throws std::system_error naming @p what and @p name.
template <typename Object>
Object value_or_throw(Object object, const std::error_code& ec, const char* what, std::string_view name) {
    if (ec) throw std::system_error(ec, std::string(what) + ' ' + std::string(name));
    return object;
}

}  // namespace steward::detail
