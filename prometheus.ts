/**
 * `kvtransfer/prometheus`: a communicator's counts as Prometheus metrics, through prom-client (see
 * {@link register}).
 *
 * @packageDocumentation
 */
export { METRIC_NAMES, register, type PrometheusOptions } from './lib/prometheus.js'
