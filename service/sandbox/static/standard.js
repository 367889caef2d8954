/*
 * Toss Payments SDK v2 stand-in (billing registration only), served by the local sandbox at
 * /v2/standard. Same surface as https://js.tosspayments.com/v2/standard for card billing:
 *
 *   const payment = TossPayments(clientKey).payment({ customerKey });
 *   await payment.requestBillingAuth({ method: "CARD", successUrl, failUrl,
 *                                      customerName, customerEmail });
 *
 * The browser is sent to the sandbox's card form; on success it lands on
 * successUrl?customerKey=...&authKey=..., otherwise on failUrl?code=...&message=...
 */
(function (global) {
  "use strict";

  var ORIGIN = new URL(document.currentScript.src).origin;
  var CUSTOMER_KEY = /^[A-Za-z0-9_=.@-]{2,50}$/;
  var ANONYMOUS = "@@ANONYMOUS";

  function sdkError(name, code, message) {
    var error = new Error(message);
    error.name = name;
    error.code = code;
    return error;
  }

  function hasOrigin(url) {
    try {
      var parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:";
    } catch (e) {
      return false;
    }
  }

  function optionalText(params, key) {
    var value = params[key];
    if (value === undefined || value === null) return null;
    if (typeof value !== "string" || value.length > 100) {
      throw sdkError("InvalidParametersError", "INVALID_PARAMETERS",
        key + "은(는) 100자 이하의 문자열이어야 합니다.");
    }
    return value;
  }

  function billingAuthUrl(clientKey, customerKey, params) {
    if (!params || params.method !== "CARD") {
      throw sdkError("NotSupportedMethodError", "NOT_SUPPORTED_METHOD",
        "샌드박스는 카드(CARD) 자동결제 등록만 지원합니다.");
    }
    if (customerKey === ANONYMOUS) {
      throw sdkError("InvalidParametersError", "INVALID_CUSTOMER_KEY",
        "자동결제 등록에는 고유한 customerKey가 필요합니다.");
    }
    if (!hasOrigin(params.successUrl)) {
      throw sdkError("IncorrectSuccessUrlFormatError", "INCORRECT_SUCCESS_URL_FORMAT",
        "successUrl은 오리진을 포함한 전체 URL이어야 합니다.");
    }
    if (!hasOrigin(params.failUrl)) {
      throw sdkError("IncorrectFailUrlFormatError", "INCORRECT_FAIL_URL_FORMAT",
        "failUrl은 오리진을 포함한 전체 URL이어야 합니다.");
    }
    var query = new URLSearchParams({
      clientKey: clientKey,
      customerKey: customerKey,
      successUrl: params.successUrl,
      failUrl: params.failUrl
    });
    var name = optionalText(params, "customerName");
    var email = optionalText(params, "customerEmail");
    if (name !== null) query.set("customerName", name);
    if (email !== null) query.set("customerEmail", email);
    return ORIGIN + "/v2/billing-auth?" + query.toString();
  }

  function Payment(clientKey, customerKey) {
    this.requestBillingAuth = function (params) {
      return new Promise(function (resolve, reject) {
        try {
          global.location.assign(billingAuthUrl(clientKey, customerKey, params));
          // Redirect flow: the page navigates away, the promise never settles.
        } catch (error) {
          reject(error);
        }
      });
    };
  }

  function TossPayments(clientKey) {
    if (typeof clientKey !== "string" || !/^(test|live)_g?ck_/.test(clientKey)) {
      throw sdkError("InvalidClientKeyError", "INVALID_CLIENT_KEY",
        "클라이언트 키(test_ck_ / live_ck_)를 확인해주세요.");
    }
    return {
      payment: function (options) {
        if (/_gck_/.test(clientKey)) {
          throw sdkError("NotSupportedWidgetKeyError", "NOT_SUPPORTED_WIDGET_KEY",
            "결제위젯 연동 키는 지원하지 않습니다. API 개별 연동 키를 사용해주세요.");
        }
        var customerKey = options && options.customerKey;
        if (typeof customerKey === "string" && /_g?sk_/.test(customerKey)) {
          throw sdkError("InsecureKeyUsageError", "INSECURE_KEY_USAGE",
            "시크릿 키를 customerKey로 사용할 수 없습니다.");
        }
        if (typeof customerKey !== "string" || !CUSTOMER_KEY.test(customerKey)) {
          throw sdkError("InvalidParametersError", "INVALID_CUSTOMER_KEY",
            "customerKey는 영문 대소문자, 숫자, 특수문자(-, _, =, ., @)로 2자 이상 50자 이하여야 합니다.");
        }
        return new Payment(clientKey, customerKey);
      }
    };
  }

  TossPayments.ANONYMOUS = ANONYMOUS;
  global.TossPayments = TossPayments;
})(window);
