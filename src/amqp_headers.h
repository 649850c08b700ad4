/*
 * rabbitmq-c's headers, wherever the installed version keeps them: 0.12
 * moved them from <amqp.h> to <rabbitmq-c/amqp.h> (configure probes both
 * and defines HAVE_RABBITMQ_C_AMQP_H for the new place).
 */
#ifndef SAGAD_AMQP_HEADERS_H
#define SAGAD_AMQP_HEADERS_H

#if defined(HAVE_RABBITMQ_C_AMQP_H)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/ssl_socket.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#endif

#endif
